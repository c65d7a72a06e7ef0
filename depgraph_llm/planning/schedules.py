"""Non-uniform width schedules: how many MLP channels each layer keeps when the layers may differ.

Both start from the uniform plan's head counts (attention stays uniform) and redistribute the MLP removal:
- "global": rank the channels of all layers together on scores normalised by their layer's mean, so a layer
  whose channels matter less loses more (LLM-Pruner / Torch-Pruning "global pruning" with normalisation);
- "log-increase": the removed fraction grows with depth as log(layer + 2) (SlimGPT's non-uniform schedule:
  early layers are kept wider because errors made there propagate through every later layer).
The total removed fraction still hits --ratio within the tolerance; widths are multiples of --round-to.
In a mixture of experts the redistributed widths are the routed experts' shared width of each layer
(`expert_channels`) and any ordinary MLP beside it (Qwen2-MoE's shared expert), each on its own size; the
expert counts stay as planned.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from depgraph_llm.graph.coupling import CouplingGraph
from depgraph_llm.errors import UserError
from depgraph_llm.graph.groups import GroupKind
from depgraph_llm.planning.budget import RATIO_TOLERANCE, ParamCounter, top_k

MAX_LAYER_REMOVAL = 0.95
NONUNIFORM = ("global", "log-increase")


def _round_width(width: float, size: int, round_to: int) -> int:
    step = max(1, round_to)
    return int(min(size, max(step, step * round(width / step))))


REDISTRIBUTED = (GroupKind.CHANNELS, GroupKind.EXPERT_CHANNELS)


def _widths_log_increase(sizes: list[int], positions: list[int], scale: float, round_to: int) -> list[int]:
    """Widths whose removed fraction grows as log(position + 2) (position: the layer's rank among pruned layers)."""
    weights = [math.log(i + 2) for i in positions]
    mean = sum(weights) / len(weights)
    return [_round_width(size * (1 - min(MAX_LAYER_REMOVAL, scale * w / mean)), size, round_to)
            for size, w in zip(sizes, weights)]


def _widths_global(normalised: list[torch.Tensor], threshold: float, round_to: int) -> list[int]:
    widths = []
    for scores in normalised:
        size = len(scores)
        kept = int((scores >= threshold).sum())
        widths.append(_round_width(max(kept, size * (1 - MAX_LAYER_REMOVAL)), size, round_to))
    return widths


def plan_nonuniform(coupling: CouplingGraph, counter: ParamCounter, scores: dict[str, torch.Tensor], ratio: float,
                    round_to: int, schedule: str, head_keep: dict[str, int],
                    reference: int) -> tuple[dict[str, list[int]], int]:
    """Per-layer MLP keep lists for `schedule`, given the head counts kept; returns (keep, params_after)."""
    gone = counter.removed_layers
    mlp = sorted((g for g in coupling.groups if g.kind in REDISTRIBUTED and g.layer is not None
                  and g.layer not in gone), key=lambda g: (g.layer, g.kind.value))
    if not mlp:
        raise UserError(f"--schedule {schedule} redistributes MLP channels, and this model has none; use uniform")
    target = reference * (1.0 - ratio)
    sizes = [g.size for g in mlp]
    layers = sorted({g.layer for g in mlp})
    positions = [layers.index(g.layer) for g in mlp]
    if schedule == "log-increase":
        make: Callable[[float], list[int]] = lambda s: _widths_log_increase(sizes, positions, s, round_to)
        mean_weight = sum(math.log(i + 2) for i in positions) / len(positions)
        lo, hi = 0.0, mean_weight / math.log(2)  # at hi every layer is cut to the MAX_LAYER_REMOVAL cap
    else:
        normalised = [scores[g.name] / scores[g.name].mean().clamp_min(1e-30) for g in mlp]
        make = lambda t: _widths_global(normalised, t, round_to)
        lo, hi = 0.0, float(max(s.max() for s in normalised)) + 1.0

    def params(widths: list[int]) -> int:
        return counter.count({**head_keep, **{g.name: w for g, w in zip(mlp, widths)}})

    for _ in range(60):  # bisection on the schedule's single knob (larger knob -> fewer parameters)
        mid = (lo + hi) / 2
        if params(make(mid)) > target:
            lo = mid
        else:
            hi = mid
    widths = min((make(lo), make(hi)), key=lambda w: abs(params(w) - target))
    params_after = params(widths)
    achieved = 1.0 - params_after / reference
    if abs(achieved - ratio) > RATIO_TOLERANCE:
        raise UserError(f"--schedule {schedule} cannot reach ratio {ratio} within ±{RATIO_TOLERANCE} (nearest "
                        f"{achieved:.3f}); try --schedule uniform or a smaller --round-to")
    keep = {g.name: top_k(scores[g.name], w) for g, w in zip(mlp, widths) if w < g.size}
    return keep, params_after
