"""Every estimator and schedule through the prune job, replayed byte-identically by `apply`; per-kind ratios,
layer ranges and tensor-parallel rounding honoured exactly."""
import json

import pytest

from depgraph_llm.importance import ESTIMATORS
from depgraph_llm.pipeline import PruneOptions, run_apply, run_prune
from depgraph_llm.errors import UserError
from tests.tiny import save_tiny_checkpoint

SMALL = dict(seq_len=32, calibration_samples=2, eval_tokens=64, round_to=1, show_progress=False, evaluate=False,
             reconstruct="none")


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory):
    """5 layers, 64 MLP channels, 4 query / 2 KV heads: room for non-uniform schedules."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("deep") / "tiny", tie=True, num_hidden_layers=5,
                                intermediate_size=64)


def _prune_and_replay(checkpoint, tmp_path, **options):
    out = tmp_path / "pruned"
    result = run_prune(PruneOptions(model=str(checkpoint), out=out, **{**SMALL, **options}))
    replay = tmp_path / "replay"
    run_apply(out / "prune_plan.json", str(checkpoint), replay)
    assert (out / "model.safetensors").read_bytes() == (replay / "model.safetensors").read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((replay / "config.json").read_text())
    return result, json.loads((out / "prune_plan.json").read_text())


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_every_estimator_prunes_and_replays(estimator, deep_checkpoint, tmp_path):
    result, plan = _prune_and_replay(deep_checkpoint, tmp_path, ratio=0.3, importance=estimator, seed=3)
    assert plan["estimator"] == estimator and plan["seed"] == 3 and plan["keep"]
    assert abs(result.report["ratio_achieved"] - 0.3) <= 0.01


@pytest.mark.parametrize("schedule", ["global", "log-increase", "depth", "layers", "layers:2:4"])
def test_every_schedule_prunes_and_replays(schedule, deep_checkpoint, tmp_path):
    result, plan = _prune_and_replay(deep_checkpoint, tmp_path, ratio=0.3, schedule=schedule)
    assert abs(result.report["ratio_achieved"] - 0.3) <= 0.01
    widths = [row["mlp"] for row in result.report["layer_widths_after"]]
    if schedule == "log-increase":
        assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]
    if schedule == "depth":
        assert plan["removed_layers"]
    if schedule.startswith("layers"):
        start, stop = (1, 4) if schedule == "layers" else (2, 4)
        untouched = [row for row in result.report["layer_widths_after"] if not start <= row["layer"] < stop]
        assert all(row["mlp"] == 64 and row["q_heads"] == 4 for row in untouched)
        assert all(row["mlp"] < 64 for row in result.report["layer_widths_after"] if start <= row["layer"] < stop)


def test_per_kind_ratios_are_exact(deep_checkpoint, tmp_path):
    result, plan = _prune_and_replay(deep_checkpoint, tmp_path, ratio=0.3, head_ratio=0.5, tp_size=2)
    rows = result.report["layer_widths_after"]
    assert {row["q_heads"] for row in rows} == {2} and all(row["mlp"] % 2 == 0 for row in rows)
    assert plan["allocation"] == {"head_ratio": 0.5, "tp_size": 2}
    result, plan = _prune_and_replay(deep_checkpoint, tmp_path / "b", ratio=0.4, layers_removed=1)
    assert len(plan["removed_layers"]) == 1 and abs(result.report["ratio_achieved"] - 0.4) <= 0.01
    result, plan = _prune_and_replay(deep_checkpoint, tmp_path / "c", ratio=0.3, hidden_ratio=0.25)
    assert len(plan["keep"]["hidden"]) == 36  # 48 * 0.75, a multiple of the 4 query heads


def test_unreachable_per_kind_combination_is_one_clear_error(deep_checkpoint, tmp_path):
    with pytest.raises(UserError, match="cannot be reached.*nearest reachable ratio"):
        run_prune(PruneOptions(model=str(deep_checkpoint), out=tmp_path / "x", ratio=0.05, mlp_ratio=0.9, **SMALL))
    with pytest.raises(UserError, match="layers:A:B"):
        PruneOptions(model=str(deep_checkpoint), ratio=0.2, schedule="layers:x").validate()
