"""Least-squares reconstruction: exact where the kept channels can express the output, used by prune.py."""
import json

import torch
from torch import nn

from recovery.least_squares import assign_weights, least_squares_weights
from tests.cli_helpers import FAST, one_line_error, run_cli, run_prune


class Toy(nn.Module):
    """embedding (6) -> up (8 channels, rank <= 6) -> down (5): 2 channels are combinations of the other 6."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.up, self.down = nn.Embedding(40, 6), nn.Linear(6, 8, bias=False), nn.Linear(8, 5)

    def forward(self, input_ids, use_cache=False):
        return self.down(self.up(self.emb(input_ids)))


def test_ls_recovers_reachable_outputs_exactly():
    model = Toy()
    batches = [torch.arange(40).reshape(2, 20)]
    kept = torch.tensor([0, 1, 3, 4, 6, 7])
    with torch.no_grad():
        expected = model(batches[0])
    weights = least_squares_weights(model, {"down": kept}, batches, damp=1e-10)
    naive = nn.Linear(6, 5)
    with torch.no_grad():
        naive.weight.copy_(model.down.weight[:, kept])
        naive.bias.copy_(model.down.bias)
    model.up.weight = nn.Parameter(model.up.weight[kept])
    model.down.weight = nn.Parameter(model.down.weight[:, kept])
    with torch.no_grad():
        before = (naive(model.up(model.emb(batches[0]))) - expected).abs().max()
        assign_weights(model, weights)
        after = (model(batches[0]) - expected).abs().max()
    assert before > 1e-2 and after < 1e-4


def test_prune_with_reconstruction_and_no_replay(tiny_checkpoint, tmp_path):
    out = tmp_path / "ls"
    result = run_prune("--model", str(tiny_checkpoint), "--ratio", "0.3", "--out", str(out), "--reconstruct", "ls",
                       *FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads((out / "prune_plan.json").read_text())
    assert plan["reconstruct"] == "ls" and abs(plan["ratio_achieved"] - 0.3) <= 0.01
    report = json.loads((out / "prune_report.json").read_text())
    assert "reconstruct" in report["timings_s"]
    line = one_line_error(run_cli("apply", str(out / "prune_plan.json"), "--model", str(tiny_checkpoint),
                                  "--out", str(tmp_path / "replay")))
    assert "rerun `prune`" in line and not (tmp_path / "replay").exists()
