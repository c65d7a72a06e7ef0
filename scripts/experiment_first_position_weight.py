"""Experiment (docs/cross-block.md, session 11): weight the first position of every calibration window by W in
every linear-layer input statistic the layer pipeline gathers (the rows are scaled by sqrt(W) before they are
flattened, so X^T X counts them W times), prune with the given prune.py flags, then print the perplexity on each
register's evaluation part, as scripts/bench_grid.py measures it.

    SINK_WEIGHT=16 python scripts/experiment_first_position_weight.py --ratio 0.5 --out DIR --no-eval

Not a feature: it patches `Recorder.inputs` for this process only. The gradients (Taylor scores) are unweighted.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grid import prune_and_score

from depgraph_llm.layers import callbacks

WEIGHT = float(os.environ.get("SINK_WEIGHT", "16"))
POSITIONS = int(os.environ.get("SINK_POSITIONS", "1"))


def weighted_inputs(self, module, callback) -> None:
    """Recorder.inputs with the first POSITIONS positions of each window scaled by sqrt(WEIGHT)."""
    def hook(_module, args, _out):
        x = args[0]
        if x.dim() == 3 and x.shape[1] > POSITIONS:
            scale = torch.ones(x.shape[1], 1, dtype=x.dtype, device=x.device)
            scale[:POSITIONS] = WEIGHT ** 0.5
            x = x * scale
        callback(x.reshape(-1, x.shape[-1]))
    self.handles.append(module.register_forward_hook(hook))


def main() -> int:
    callbacks.Recorder.inputs = weighted_inputs
    return prune_and_score({"weight": WEIGHT, "positions": POSITIONS})


if __name__ == "__main__":
    sys.exit(main())
