"""Cross-block reconstruction and block-output errors (recovery/cross_block.py): the refit lowers the calibration
error it optimises, removed columns stay zero so the slimmed model equals the masked one, an unpruned model is left
bit for bit alone, and the calibration / held-out errors match a hand computation from forward hooks on the dense
and the pruned model (held-out windows that repeat a calibration window are dropped)."""
import copy
import json
from pathlib import Path

import pytest
import torch

from depgraph_llm.errors import UserError
from depgraph_llm.graph.coupling import build_coupling
from depgraph_llm.layers import InMemorySource, LayerPipeline
from depgraph_llm.layers.pipeline import LayerSink
from depgraph_llm.layers.sink import SliceSink
from depgraph_llm.models import spec_for
from depgraph_llm.job.options import PruneOptions
from depgraph_llm.job.replay_plan import run_apply
from depgraph_llm.job.prune import run_prune
from depgraph_llm.planning.plan import axis_masks
from depgraph_llm.recovery.cross_block import relative_error, CrossBlockSettings, disjoint_windows, prepare_cross_block
from depgraph_llm.recovery.reconstruct import prepare_reconstruction
from depgraph_llm.removal.apply import apply_plan
from depgraph_llm.cli.summary import _reconstruction
from tests.cli_helpers import FAST, one_line_error, run_prune as run_prune_cli
from tests.test_slim_checkpoints import SHAPES, _plan
from tests.tiny import tiny_model

LICENCE = Path("/usr/share/common-licenses/GPL-2")
BATCHES = [torch.randint(3, 160, (1, 40), generator=torch.Generator().manual_seed(s)) for s in range(4)]
HELDOUT = [torch.randint(3, 160, (1, 40), generator=torch.Generator().manual_seed(100 + s)) for s in range(3)]
REFIT = CrossBlockSettings(window=2, epochs=30, lr=1e-3)


def _reconstruct(model, coupling, plan, settings: CrossBlockSettings, heldout=(), sink=None, method: str = "ls"):
    """The reconstruction pass with the cross-block stage last; returns that stage's report."""
    dense = prepare_reconstruction(coupling, plan, BATCHES, method, "sequential")
    blocks = prepare_cross_block(coupling, plan, settings, BATCHES, list(heldout), "sequential")
    stages = [s for s in (dense, blocks) if s is not None]
    LayerPipeline(InMemorySource(model, coupling.layers_path), stages, sink or LayerSink()).run(BATCHES)
    return blocks.report


@torch.no_grad()
def _block_outputs(model, batches) -> list[list[torch.Tensor]]:
    """[layer][batch] outputs of every decoder layer, from forward hooks on a plain model forward."""
    layers = model.model.layers
    seen = [[] for _ in layers]
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: seen[i].append(
        (out[0] if isinstance(out, tuple) else out).double())) for i, layer in enumerate(layers)]
    for ids in batches:
        model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return seen


def _hand_error(pruned: list[torch.Tensor], dense: list[torch.Tensor]) -> float:
    """Mean over every token of every batch of its squared error over its squared norm, one token at a time."""
    ratios = [((p[b, t] - d[b, t]) ** 2).sum().item() / (d[b, t] ** 2).sum().item()
              for p, d in zip(pruned, dense) for b in range(d.shape[0]) for t in range(d.shape[1])]
    return sum(ratios) / len(ratios)


def test_refit_lowers_the_calibration_block_error_of_the_closed_form():
    model = tiny_model()
    coupling = build_coupling(model)
    plan = _plan(model, coupling, SHAPES["gqa-dropped-kv-groups"])
    closed = _reconstruct(copy.deepcopy(model), coupling, plan, CrossBlockSettings())
    tuned = _reconstruct(copy.deepcopy(model), coupling, plan, REFIT)
    assert closed.calibration[-1] > 1e-4  # something to recover
    assert tuned.calibration[1] < 0.8 * closed.calibration[1]  # the first window's output (layers 0-1)
    assert tuned.calibration[-1] < closed.calibration[-1]
    assert tuned.refit_windows == 2 and all(a < b for a, b in zip(tuned.refit_loss_after, tuned.refit_loss_before))


def test_removed_columns_stay_zero_and_the_slimmed_model_equals_the_masked_one():
    model = tiny_model()
    coupling = build_coupling(model)
    plan = _plan(model, coupling, SHAPES["heterogeneous-heads"])
    plan.keep["layers.0.mlp.channels"] = list(range(0, 37, 2))  # MLP channels too
    masked, refit = copy.deepcopy(model), CrossBlockSettings(window=2, epochs=10, lr=1e-3)
    _reconstruct(masked, coupling, plan, refit)
    changed = False
    for (param, axis), keep in axis_masks(coupling, plan).items():
        if param.endswith(("down_proj.weight", "o_proj.weight")) and axis == 1 and not keep.all():
            weight = masked.get_parameter(param)
            assert torch.count_nonzero(weight[:, ~keep]) == 0, param
            changed |= not torch.equal(weight, model.get_parameter(param))
    assert changed
    slimmed = copy.deepcopy(masked)
    apply_plan(slimmed, coupling, plan, spec_for("llama"))
    assert sum(p.numel() for p in slimmed.parameters()) < sum(p.numel() for p in masked.parameters())
    ids = HELDOUT[0]
    with torch.no_grad():
        torch.testing.assert_close(slimmed(input_ids=ids).logits, masked(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
        in_pass = copy.deepcopy(model)  # sliced by the sink during the pass: window layers tuned at their widths
        _reconstruct(in_pass, coupling, plan, refit, sink=SliceSink(coupling, plan, spec_for("llama")))
        closed = copy.deepcopy(model)
        _reconstruct(closed, coupling, plan, CrossBlockSettings())
        refit_change = (masked(input_ids=ids).logits - closed(input_ids=ids).logits).norm()
        # Adam's normalised steps carry the rounding of the other matmul shapes along: close, not bit-equal
        assert (in_pass(input_ids=ids).logits - masked(input_ids=ids).logits).norm() < 0.05 * refit_change


def test_with_nothing_pruned_the_refit_changes_nothing():
    model = tiny_model()
    coupling = build_coupling(model)
    plan = _plan(model, coupling, ([37, 37, 37], [2, 2, 2], [2, 2, 2], []))
    tuned = copy.deepcopy(model)
    report = _reconstruct(tuned, coupling, plan, REFIT, HELDOUT)
    assert report.calibration == [0.0, 0.0, 0.0] and report.heldout == [0.0, 0.0, 0.0]
    for (name, before), after in zip(model.state_dict().items(), tuned.state_dict().values()):
        assert torch.equal(before, after), name


def test_heldout_error_is_measured_on_disjoint_windows_and_matches_a_hand_computation():
    model = tiny_model()
    coupling = build_coupling(model)
    plan = _plan(model, coupling, SHAPES["heterogeneous-mlp"])
    pruned = copy.deepcopy(model)
    report = _reconstruct(pruned, coupling, plan, REFIT, heldout=[*HELDOUT, BATCHES[2]])  # one repeats a calibration window
    assert report.heldout_windows == len(HELDOUT)
    dense_held, pruned_held = _block_outputs(model, HELDOUT), _block_outputs(pruned, HELDOUT)
    dense_cal, pruned_cal = _block_outputs(model, BATCHES), _block_outputs(pruned, BATCHES)
    for layer in range(3):
        assert report.heldout[layer] == pytest.approx(_hand_error(pruned_held[layer], dense_held[layer]), rel=1e-5)
        assert report.calibration[layer] == pytest.approx(_hand_error(pruned_cal[layer], dense_cal[layer]), rel=1e-5)
    assert report.heldout[1] != pytest.approx(report.calibration[1], rel=1e-3)
    summary = report.to_dict()
    assert summary["error_heldout"]["mean"] == pytest.approx(sum(report.heldout) / 3, abs=1e-7)
    assert summary["cross_block"]["window"] == 2


def test_block_error_is_not_swamped_by_one_massive_activation():
    """One token holding almost all of the stream's energy (an attention sink) must not hide the error of the
    others: every other token is off by half its norm, the sink is exact."""
    torch.manual_seed(0)
    dense = torch.randn(2, 8, 16)
    dense[:, 0, 3] = 1e4
    noise = torch.randn_like(dense)
    noise[:, 0] = 0
    noise = noise / noise.norm(dim=-1, keepdim=True).clamp_min(1e-30) * 0.5 * dense.norm(dim=-1, keepdim=True)
    error = relative_error([dense + noise], [dense])
    assert error == pytest.approx(_hand_error([dense + noise], [dense]), rel=1e-6)
    assert error == pytest.approx(0.25 * 7 / 8, rel=1e-6)  # 14 of 16 tokens at (1/2)^2, 2 sinks at 0


def test_disjoint_windows_drops_only_repeats():
    kept = disjoint_windows([BATCHES[0], HELDOUT[0], BATCHES[3][:, :20], BATCHES[3]], BATCHES)
    assert len(kept) == 2 and torch.equal(kept[0], HELDOUT[0]) and torch.equal(kept[1], BATCHES[3][:, :20])


def test_prune_reports_both_errors_and_apply_replays_the_refit(tiny_checkpoint, tmp_path):
    common = dict(model=str(tiny_checkpoint), ratio=0.3, seq_len=32, calibration_samples=3, round_to=1,
                  show_progress=False, eval_tokens=64, eval_seq_len=32, calibration=str(LICENCE),
                  eval_text="/usr/share/common-licenses/Apache-2.0", reconstruct="ls")
    run_prune(PruneOptions(out=tmp_path / "closed", **common))
    run_prune(PruneOptions(out=tmp_path / "tuned", cross_block=2, cross_block_epochs=10, cross_block_lr=1e-4, **common))
    closed = json.loads((tmp_path / "closed" / "prune_report.json").read_text())["reconstruct_report"]
    tuned = json.loads((tmp_path / "tuned" / "prune_report.json").read_text())["reconstruct_report"]
    for record in (closed, tuned):
        assert len(record["error_calibration"]["per_layer"]) == 3 and record["error_heldout"]["windows"] == 3
        assert all(e is not None and e > 0 for e in record["error_heldout"]["per_layer"])
    assert "cross_block" not in closed and tuned["cross_block"]["windows_tuned"] == 2
    assert tuned["error_calibration"]["mean"] < closed["error_calibration"]["mean"]
    assert all(a <= b for a, b in zip(tuned["cross_block"]["loss_after"], tuned["cross_block"]["loss_before"]))
    run_apply(tmp_path / "tuned" / "prune_plan.json", str(tiny_checkpoint), tmp_path / "replayed")
    from safetensors.torch import load_file

    tuned_w = load_file(tmp_path / "tuned" / "model.safetensors")
    replayed = load_file(tmp_path / "replayed" / "model.safetensors")
    assert tuned_w.keys() == replayed.keys() and all(torch.equal(tuned_w[n], replayed[n]) for n in tuned_w)


@pytest.mark.parametrize("options, match", [
    (dict(cross_block=2, reconstruct="none"), "closed-form"),
    (dict(cross_block=-1), "--cross-block -1"),
    (dict(cross_block=2, cross_block_epochs=0), "--cross-block-epochs"),
    (dict(cross_block=2, cross_block_lr=0.0), "--cross-block-lr"),
    (dict(cross_block=2, hidden_ratio=0.2, hidden_method="rotate"), "--hidden-ratio"),
    (dict(cross_block=2, reconstruct_mode="local"), "--reconstruct-mode sequential"),
])
def test_bad_cross_block_options_are_one_line_errors(options, match):
    with pytest.raises(UserError, match=match):
        PruneOptions(**options).validate()


def test_cross_block_needs_the_sequential_stream():
    model = tiny_model()
    coupling = build_coupling(model)
    plan = _plan(model, coupling, SHAPES["uniform"])
    with pytest.raises(UserError, match="--reconstruct-mode sequential"):
        prepare_cross_block(coupling, plan, REFIT, BATCHES, [], "local")


def test_prune_py_runs_the_refit_and_refuses_it_in_local_mode(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    result = run_prune_cli("--model", str(tiny_checkpoint), "--ratio", "0.3", "--out", str(out), "--reconstruct", "ls",
                           "--cross-block", "3", "--cross-block-lr", "1e-4", "--cross-block-epochs", "3",
                           "--calibration", str(LICENCE), "--eval-text", "/usr/share/common-licenses/Apache-2.0", *FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((out / "prune_report.json").read_text())["reconstruct_report"]
    assert record["cross_block"]["window"] == 3 and record["cross_block"]["windows_tuned"] == 1
    assert record["error_heldout"]["windows"] == 2 and record["error_heldout"]["mean"] > 0
    assert "block-output error" in result.stdout + result.stderr
    line = one_line_error(run_prune_cli("--model", str(tiny_checkpoint), "--ratio", "0.3", "--out", str(tmp_path / "o"),
                                        "--cross-block", "2", "--reconstruct-mode", "local", *FAST))
    assert "--reconstruct-mode sequential" in line and not (tmp_path / "o").exists()


def test_summary_line_shows_calibration_and_heldout_errors():
    report = {"reconstruct": "obs (sequential)", "reconstruct_report": {
        "consumers": 6, "relative_error_before": 0.5, "relative_error_after": 0.25,
        "error_calibration": {"mean": 0.0123}, "error_heldout": {"mean": 0.0456}, "cross_block": {"window": 2}}}
    line = _reconstruction(report)
    assert "0.0123 (calibration) / 0.0456 (held-out)" in line and "2 layers at a time" in line
    assert "anchor" not in line
    assert _reconstruction({**report, "reconstruct_anchor": 0.25}).startswith("obs (sequential), anchor 0.25: 6 ")
