"""`depgraph-llm apply` replays reconstructed plans: the calibration windows are drawn again from the plan's record
and the same layer pass reproduces the pruned weights byte for byte; changed text is refused in one line."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from depgraph_llm.errors import UserError
from depgraph_llm.job.options import PruneOptions
from depgraph_llm.job.replay_plan import run_apply
from depgraph_llm.job.prune import run_prune

LICENCE = Path("/usr/share/common-licenses/GPL-2")


def _prune(model: Path, out: Path, **options) -> None:
    run_prune(PruneOptions(model=str(model), out=out, ratio=0.3, seq_len=32, calibration_samples=4, round_to=1,
                           show_progress=False, evaluate=False, **options))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {n: t for f in sorted(folder.glob("*.safetensors")) for n, t in load_file(f).items()}


@pytest.mark.parametrize("recipe", [dict(reconstruct="obs"), dict(reconstruct="ls", reconstruct_mode="local"),
                                    dict(reconstruct="obs", calibration="self"),
                                    dict(reconstruct="obs", reconstruct_anchor=0.5),
                                    dict(reconstruct="obs", head_ratio=0.5)])  # OBS re-chooses query heads too
def test_apply_reproduces_a_reconstructed_prune_byte_for_byte(tiny_checkpoint, tmp_path, recipe):
    recipe = {"calibration": str(LICENCE), **recipe}
    _prune(tiny_checkpoint, tmp_path / "pruned", **recipe)
    plan = json.loads((tmp_path / "pruned" / "prune_plan.json").read_text())
    assert plan["reconstruct"] == recipe["reconstruct"] and plan["calibration"]["windows_sha256"]
    if "head_ratio" in recipe:
        assert any(name.endswith("query_per_kv") for name in plan["chosen_by"]), plan["chosen_by"]
    run_apply(tmp_path / "pruned" / "prune_plan.json", str(tiny_checkpoint), tmp_path / "replayed")
    pruned, replayed = _weights(tmp_path / "pruned"), _weights(tmp_path / "replayed")
    assert pruned.keys() == replayed.keys()
    assert all(torch.equal(pruned[n], replayed[n]) for n in pruned)
    unrefitted = tmp_path / "plain"  # the oracle is not trivial: without the refit the weights differ
    _prune(tiny_checkpoint, unrefitted, **{**recipe, "reconstruct": "none", "reconstruct_mode": "sequential"})
    plain = _weights(unrefitted)
    assert any(not torch.equal(pruned[n], plain[n]) for n in pruned if plain.get(n) is not None
               and plain[n].shape == pruned[n].shape)


def test_apply_refuses_calibration_text_that_changed(tiny_checkpoint, tmp_path):
    text = tmp_path / "calibration.txt"
    shutil.copy(LICENCE, text)
    _prune(tiny_checkpoint, tmp_path / "pruned", calibration=str(text))
    text.write_text(text.read_text().replace("software", "hardware"))
    with pytest.raises(UserError, match="changed since the plan was made"):
        run_apply(tmp_path / "pruned" / "prune_plan.json", str(tiny_checkpoint), tmp_path / "replayed")
    assert not (tmp_path / "replayed").exists()


def test_apply_refuses_a_reconstructed_plan_without_a_calibration_record(tiny_checkpoint, tmp_path):
    _prune(tiny_checkpoint, tmp_path / "pruned", calibration=str(LICENCE))
    plan_path = tmp_path / "pruned" / "prune_plan.json"
    plan = json.loads(plan_path.read_text())
    plan.pop("calibration")
    plan_path.write_text(json.dumps(plan))
    with pytest.raises(UserError, match="no record of its calibration windows"):
        run_apply(plan_path, str(tiny_checkpoint), tmp_path / "replayed")


def test_apply_refuses_calibration_text_that_is_gone(tiny_checkpoint, tmp_path):
    text = tmp_path / "calibration.txt"
    shutil.copy(LICENCE, text)
    _prune(tiny_checkpoint, tmp_path / "pruned", calibration=str(text))
    text.unlink()
    with pytest.raises(UserError, match="not on this machine"):
        run_apply(tmp_path / "pruned" / "prune_plan.json", str(tiny_checkpoint), tmp_path / "replayed")


def test_apply_refuses_an_edited_reconstructed_plan_in_one_line(tiny_checkpoint, tmp_path):
    _prune(tiny_checkpoint, tmp_path / "pruned", calibration=str(LICENCE))
    plan_path = tmp_path / "pruned" / "prune_plan.json"
    plan = json.loads(plan_path.read_text())
    plan["params_after"] += 1
    plan_path.write_text(json.dumps(plan))
    with pytest.raises(UserError, match="the plan was edited"):
        run_apply(plan_path, str(tiny_checkpoint), tmp_path / "replayed")
    assert not (tmp_path / "replayed").exists()
