"""Experiment (docs/results/bench-grid, session 14): the least-squares refit of down_proj / o_proj with an intercept.
The model first gets zero biases through its config switches (Llama: attention_bias, mlp_bias; counted in the
budget, as `--reconstruct bias` does), then every refit that the default recipe makes (OBS choice + anchored least
squares) also fits the consumer's bias: the centred problem is solved with the same solver and anchor, and the bias
is the mean residual, (sum_y - W' sum_x_kept) / tokens. Prune with the given prune.py flags, then score the folder
with `python scripts/bench_grid.py --score DIR --out docs/results/bench-grid`.

    OMP_NUM_THREADS=1 python scripts/experiment_intercept_refit.py --ratio 0.2 --out DIR --no-eval

Not a feature: it patches recovery/reconstruct.py's `_solve` and the job's `plan_in_memory` for this process only.
The relative errors in the report's reconstruct section are computed without the fitted bias.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import depgraph_llm.job.in_memory as in_memory  # noqa: E402
import depgraph_llm.recovery.reconstruct as reconstruct  # noqa: E402
from depgraph_llm.cli.commands import prune_main  # noqa: E402
from depgraph_llm.models import spec_for  # noqa: E402
from depgraph_llm.recovery.bias_params import enable_zero_biases  # noqa: E402

plain_least_squares = reconstruct.anchored_least_squares
plain_solve = reconstruct._solve
plain_kept_block = reconstruct.kept_block
plain_plan = in_memory.plan_in_memory
state: dict = {}


def centred_least_squares(gram_kept, rhs, original_kept, ridge_value, anchor):
    """The refit with an intercept: the solver on the centred Gram and targets; the bias into state["bias"]."""
    if state.get("sums") is None:
        return plain_least_squares(gram_kept, rhs, original_kept, ridge_value, anchor)
    sum_x_kept, sum_y, tokens, bias = state["sums"]
    gram_centred = gram_kept - torch.outer(sum_x_kept, sum_x_kept) / tokens
    rhs_centred = rhs + torch.outer(sum_x_kept, bias) - torch.outer(sum_x_kept, sum_y) / tokens  # rhs had - s b^T
    weight = plain_least_squares(gram_centred, rhs_centred, original_kept, ridge_value, anchor)
    state["bias"] = (sum_y - weight @ sum_x_kept) / tokens
    return weight


def solve_with_intercept(consumer, method, damp, plan, anchor=0.0):
    """reconstruct._solve, then the fitted bias written into the consumer (which has one after enable_zero_biases)."""
    module = consumer.module
    if method == "bias" or module.bias is None:
        state["sums"] = None
        return plain_solve(consumer, method, damp, plan, anchor)
    sum_x, tokens = consumer.stats.sum_x.cpu(), consumer.stats.tokens
    weight = module.weight.detach().double().cpu()
    bias = module.bias.detach().double().cpu()

    def kept_block(gram, kept):  # _solve calls this once, with the kept columns, just before the solve
        state["sums"] = (sum_x[kept], weight @ sum_x + tokens * bias, tokens, bias)
        return plain_kept_block(gram, kept)

    reconstruct.kept_block = kept_block
    try:
        errors = plain_solve(consumer, method, damp, plan, anchor)
    finally:
        reconstruct.kept_block = plain_kept_block
    with torch.no_grad():
        module.bias.copy_(state["bias"].to(module.bias.dtype))
    state["sums"] = None
    return errors


def plan_with_biases(model, *args, **kwargs):
    added = enable_zero_biases(model, spec_for(model.config.model_type).bias_switches)
    print(f"zero biases added: {len(added)}", file=sys.stderr, flush=True)
    return plain_plan(model, *args, **kwargs)


def main() -> int:
    reconstruct.anchored_least_squares = centred_least_squares
    reconstruct._solve = solve_with_intercept
    in_memory.plan_in_memory = plan_with_biases
    sys.argv = ["prune.py", *sys.argv[1:]]
    return prune_main()


if __name__ == "__main__":
    sys.exit(main())
