"""Ratio -> kept units. The uniform schedule gives every layer the same widths (a stock-config checkpoint)."""
from __future__ import annotations

import copy
import logging
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from depgraph_llm.graph.coupling import CouplingGraph
from depgraph_llm.errors import UserError
from depgraph_llm.graph.groups import Group, GroupKind

log = logging.getLogger(__name__)
RATIO_TOLERANCE = 0.01


@dataclass(frozen=True)
class Widths:
    """Uniform per-layer widths: MLP channels, KV groups (or heads), query heads per KV group."""

    mlp: int | None
    kv: int | None
    q_per_kv: int | None


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, ascending; ties go to the lower index so plans are deterministic."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


class ParamCounter:
    """Exact parameter count of the model after keeping given numbers of units per group."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], coupling: CouplingGraph,
                 removed_layers: frozenset[int] = frozenset()):
        self.shapes = shapes
        self.removed_layers = removed_layers
        self.layer_params = {g.layer: set(g.params) for g in coupling.of_kind(GroupKind.LAYER)}
        # a fused axis holds several segments (offsets); each is a row-major grid of factors
        self.places: dict[str, list[tuple[tuple[str, int, int], int, int | None]]] = {}
        self.factors: dict[tuple[str, int, int], tuple[int, ...]] = {}
        self.segments: dict[tuple[str, int], list[tuple[str, int, int]]] = defaultdict(list)
        for group in coupling.groups:
            for g in (group, group.nested):
                if g is not None:
                    self.places[g.name] = [((s.param, s.axis, s.offset), s.factor, s.outer) for s in g.slices]
                    for s in g.slices:
                        key = (s.param, s.axis, s.offset)
                        if key not in self.factors:
                            self.factors[key] = s.factors
                            self.segments[(s.param, s.axis)].append(key)

    def without_layers(self, removed: frozenset[int]) -> "ParamCounter":
        """The same counter with these decoder layers removed by default."""
        clone = copy.copy(self)
        clone.removed_layers = frozenset(removed)
        return clone

    def count(self, kept: dict[str, int], removed_layers: frozenset[int] | None = None,
              only: set[str] | None = None) -> int:
        """`kept` maps group name (or nested group name) to units kept (per outer unit for nested groups).

        With `only`, count just those parameters."""
        removed_layers = self.removed_layers if removed_layers is None else removed_layers
        factors = {key: list(f) for key, f in self.factors.items()}
        for name, k in kept.items():
            for key, factor, _outer in self.places[name]:
                factors[key][factor] = min(factors[key][factor], k)
        removed = set().union(*(self.layer_params.get(i, set()) for i in removed_layers)) if removed_layers else set()
        total = 0
        for name, shape in self.shapes.items():
            if name in removed or (only is not None and name not in only):
                continue
            numel = 1
            for axis, size in enumerate(shape):
                for key in self.segments.get((name, axis), ()):
                    size += _prod(factors[key]) - _prod(self.factors[key])
                numel *= size
            total += numel
        return total


def _prod(values: list[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def width_candidates(size: int, round_to: int) -> list[int]:
    """Allowed kept widths: multiples of round_to, plus the full width."""
    step = max(1, round_to)
    return sorted({w for w in range(step, size + 1, step)} | {size})


@dataclass(frozen=True)
class Allocation:
    """Per-kind constraints on top of --ratio (None = let the planner choose)."""

    mlp_ratio: float | None = None      # fraction of MLP channels removed in every pruned layer
    head_ratio: float | None = None     # fraction of query heads removed in every pruned layer
    hidden_ratio: float | None = None   # fraction of hidden (residual stream) channels removed
    layers_removed: int | None = None   # whole decoder layers removed (Block Influence)
    layer_range: tuple[int, int] | None = None  # prune widths only in layers [start, stop)
    tp_size: int = 1                    # head counts and widths divisible for tensor-parallel serving
    vocab_ids: tuple[int, ...] | None = None  # token ids kept by --vocab-keep (vocab.py)
    experts_keep: int | None = None     # routed experts kept in every MoE layer (--experts-keep)
    expert_ratio: float | None = None   # fraction of routed experts removed in every MoE layer (--expert-ratio)

    def accepts(self, widths: Widths, q_total: int | None) -> bool:
        """Do these uniform widths honour the head ratio and tensor-parallel divisibility?"""
        q = None if widths.kv is None else widths.kv * (widths.q_per_kv or 1)
        if self.head_ratio is not None and q is not None and q_total:
            if q != max(1, round(q_total * (1 - self.head_ratio))):
                return False
        if self.tp_size > 1 and widths.kv is not None:
            if q % self.tp_size or (widths.kv % self.tp_size and self.tp_size % widths.kv):
                return False
        return True

    def width_step(self, round_to: int) -> int:
        """What every planned MLP width is a multiple of: --round-to and the tensor-parallel size."""
        return math.lcm(max(1, round_to), self.tp_size)

    def mlp_width(self, size: int, round_to: int) -> int | None:
        if self.mlp_ratio is None:
            return None
        step = max(1, round_to)
        return int(min(size, max(step, step * round(size * (1 - self.mlp_ratio) / step))))


def plan_uniform(coupling: CouplingGraph, counter: ParamCounter, scores: dict[str, torch.Tensor], ratio: float,
                 round_to: int, is_valid: Callable[[Widths], bool],
                 loss_scaled: bool = True, reference: int | None = None,
                 allocation: Allocation = Allocation()) -> tuple[dict, dict, int]:
    """Same widths in every pruned layer; returns (keep, keep_nested, params_after) hitting `ratio` within
    tolerance, under the per-kind constraints of `allocation`.

    `reference` is the parameter count the ratio is relative to (default: the counter's full model).

    How the removal is split between attention and MLP: with loss-scaled scores (Taylor) the split that removes
    the least total importance; otherwise the split whose removed fractions of attention and MLP parameters
    are closest (proportional pruning, as LLM-Pruner does with a single ratio)."""
    gone = counter.removed_layers
    start, stop = allocation.layer_range or (0, 1 << 30)

    def pruned(g: Group) -> bool:
        return g.layer is not None and g.layer not in gone and start <= g.layer < stop

    # in a mixture of experts the routed experts' shared width is the MLP width searched; ordinary MLP channel groups
    # beside it (Qwen2-MoE's shared expert) lose the same fraction of their own width (`proportional_widths`)
    mlp = [g for g in coupling.of_kind(GroupKind.EXPERT_CHANNELS) if pruned(g)]
    beside = [g for g in coupling.of_kind(GroupKind.CHANNELS) if pruned(g)] if mlp else []
    mlp = mlp or [g for g in coupling.of_kind(GroupKind.CHANNELS) if pruned(g)]
    heads = [g for g in coupling.of_kind(GroupKind.HEADS) if pruned(g)]
    if not mlp and not heads:
        raise UserError("this model has no prunable MLP channels or attention heads in the chosen layers; "
                        "see `depgraph-llm graph`")
    total = reference or counter.count({}, removed_layers=frozenset())
    target = total * (1.0 - ratio)
    mlp_size = min((g.size for g in mlp), default=None)
    kv_size = min((g.size for g in heads), default=None)
    q_size = min((g.nested.size for g in heads if g.nested), default=None)
    q_total = (kv_size or 0) * (q_size or 1)
    fixed_mlp = allocation.mlp_width(mlp_size, round_to) if mlp_size else None
    base_keep = dict(_hidden_keep(coupling, scores, allocation, round_to, counter))
    base_keep.update(experts_kept(coupling, allocation, pruned))
    vocab_groups = [g.name for g in coupling.of_kind(GroupKind.VOCAB)] if allocation.vocab_ids else []
    base_keep.update({name: len(allocation.vocab_ids) for name in vocab_groups})
    attn_params = {s.param for g in heads for s in g.slices}
    attn_total = counter.count({}, only=attn_params) if heads else 1
    options = []
    for kv in range(1, (kv_size or 0) + 1) or [None]:
        for q in range(1, (q_size or 0) + 1) or [None]:
            widths_heads = Widths(None, kv, q)
            if not allocation.accepts(widths_heads, q_total):
                continue
            kept = {**base_keep, **_head_counts(heads, kv, q)}
            width, params_after = _search_mlp(counter, mlp, mlp_size, round_to, kept, target, fixed_mlp,
                                              lambda w: proportional_widths(beside, w, mlp_size, round_to))
            widths = Widths(width, kv, q)
            achieved = 1.0 - params_after / total
            if loss_scaled:
                cost = removed_importance(mlp, heads, scores, widths)
            else:
                attn_frac = 1.0 - counter.count(kept, only=attn_params) / attn_total
                mlp_frac = 0.0 if width is None else 1.0 - width / mlp_size
                cost = abs(attn_frac - mlp_frac)
            options.append((abs(achieved - ratio) > RATIO_TOLERANCE, cost, abs(achieved - ratio), widths, params_after))
    if not options:
        raise UserError(f"no head count satisfies --head-ratio {allocation.head_ratio} / --tp-size "
                        f"{allocation.tp_size} with {kv_size} KV groups of {q_size or 1} query heads")
    options.sort(key=lambda o: (o[0], o[1], o[2]))
    valid = [o for o in options if is_valid(o[3])]
    if not valid or valid[0][0]:
        nearest = min(valid or options, key=lambda o: o[2])
        reach = 1.0 - nearest[4] / total
        raise UserError(f"ratio {ratio} cannot be reached within ±{RATIO_TOLERANCE} with --round-to {round_to}; "
                        f"the nearest reachable ratio is {reach:.3f}" + _beyond_widths_hint(
                            counter, mlp + beside, heads, total, ratio, reach, allocation))
    widths, params_after = valid[0][3], valid[0][4]
    log.info("uniform widths: %s", widths)
    keep, keep_nested = select_units(mlp, heads, scores, widths)
    if widths.mlp is not None:
        keep.update({name: top_k(scores[name], count)
                     for name, count in proportional_widths(beside, widths.mlp, mlp_size, round_to).items()})
    for name, count in base_keep.items():
        keep[name] = list(allocation.vocab_ids) if name in vocab_groups else top_k(scores[name], count)
    return keep, keep_nested, params_after


def blank_scores(coupling: CouplingGraph) -> dict[str, torch.Tensor]:
    """Zero scores in every group's shape ((size,), or (outer, size) for a nested group): for the planning steps
    whose outcome depends on parameter counts only."""
    scores = {}
    for g in coupling.groups:
        scores[g.name] = torch.zeros(g.size)
        if g.nested is not None:
            scores[g.nested.name] = torch.zeros(g.size, g.nested.size)
    return scores


def check_reachable(coupling: CouplingGraph, counter: ParamCounter, ratio: float, round_to: int,
                    is_valid: Callable[[Widths], bool], reference: int, allocation: Allocation) -> None:
    """Raise the uniform planner's own one-line error now, before any calibration pass, when no uniform widths reach
    `ratio` under `allocation`: whether some widths land within tolerance depends on parameter counts, not on
    scores (on a 7B model streamed from disk the scores take hours, and the answer was known from the start)."""
    plan_uniform(coupling, counter, blank_scores(coupling), ratio, round_to, is_valid, reference=reference,
                 allocation=allocation)


def _beyond_widths_hint(counter: ParamCounter, mlp: list[Group], heads: list[Group], total: int, ratio: float,
                        reach: float, allocation: Allocation) -> str:
    """When the widths cannot remove enough, say how much of the model they hold and which options reach further
    (a Gemma-3-270M-like model keeps 63% of its parameters in the embeddings)."""
    if reach >= ratio - RATIO_TOLERANCE or allocation.hidden_ratio is not None or allocation.vocab_ids:
        return ""
    params = {s.param for g in mlp + heads for s in g.slices}
    share = counter.count({}, only=params) / total
    return (f"; the MLP and attention widths hold {share:.0%} of the parameters: add --hidden-ratio (narrower "
            "residual stream and embeddings), --vocab-keep N or --layers-removed N to go further")


def _hidden_keep(coupling: CouplingGraph, scores, allocation: Allocation, round_to: int,
                 counter: ParamCounter) -> dict[str, int]:
    """Hidden channels kept under --hidden-ratio: a multiple of round_to, of the tensor-parallel size and of the
    dense query-head count (stock validators check hidden % heads)."""
    if allocation.hidden_ratio is None:
        return {}
    hidden = coupling.of_kind(GroupKind.HIDDEN)
    if not hidden:
        raise UserError("--hidden-ratio: this model has no prunable hidden dimension; see `depgraph-llm graph`")
    group = hidden[0]
    heads = coupling.of_kind(GroupKind.HEADS)
    q_dense = heads[0].size * (heads[0].nested.size if heads[0].nested else 1) if heads else 1
    step = math.lcm(max(1, round_to), max(1, allocation.tp_size), q_dense)
    kept = max(step, step * round(group.size * (1 - allocation.hidden_ratio) / step))
    return {group.name: min(group.size, kept)}


def experts_kept(coupling: CouplingGraph, allocation: Allocation, pruned: Callable[[Group], bool]) -> dict[str, int]:
    """Routed experts kept per MoE layer under --experts-keep / --expert-ratio (at least one)."""
    groups = [g for g in coupling.of_kind(GroupKind.EXPERTS) if pruned(g)]
    if allocation.experts_keep is None and allocation.expert_ratio is None:
        return {}
    if not groups:
        raise UserError("--experts-keep / --expert-ratio: this model has no routed experts; see `depgraph-llm graph`")
    kept = {}
    for g in groups:
        count = allocation.experts_keep if allocation.experts_keep is not None else round(
            g.size * (1 - allocation.expert_ratio))
        if not 1 <= count <= g.size:
            raise UserError(f"--experts-keep {count}: {g.name} has {g.size} experts; keep between 1 and {g.size}")
        kept[g.name] = count
    return kept


def _head_counts(heads: list[Group], kv: int | None, q: int | None) -> dict[str, int]:
    kept = {}
    for g in heads:
        if kv is not None:
            kept[g.name] = kv
        if g.nested is not None and q is not None:
            kept[g.nested.name] = q
    return kept


def proportional_widths(groups: list[Group], width: int, size: int, round_to: int) -> dict[str, int]:
    """Kept widths of `groups` that remove the fraction of their own width that `width` of `size` removes (rounded
    to a multiple of round_to, at least one step, at most the group); only the groups that shrink."""
    step = max(1, round_to)
    widths = {g.name: int(min(g.size, max(step, step * round(g.size * width / size / step)))) for g in groups}
    return {name: w for name, w in widths.items() if w < next(g.size for g in groups if g.name == name)}


def _search_mlp(counter, mlp, mlp_size, round_to, kept, target, fixed: int | None = None,
                beside: Callable[[int], dict[str, int]] = lambda width: {}) -> tuple[int | None, int]:
    """Binary search the uniform MLP width whose parameter count is closest to target (or take `fixed`); `beside`
    gives the widths of other channel groups that follow it."""
    if not mlp:
        return None, counter.count(kept)
    candidates = [fixed] if fixed is not None else width_candidates(mlp_size, round_to)

    def params(width: int) -> int:
        return counter.count({**kept, **{g.name: width for g in mlp}, **beside(width)})

    lo, hi = 0, len(candidates) - 1
    while lo < hi:  # first width whose count reaches the target
        mid = (lo + hi) // 2
        if params(candidates[mid]) >= target:
            hi = mid
        else:
            lo = mid + 1
    near = {candidates[i] for i in (lo - 1, lo) if 0 <= i < len(candidates)}
    width = min(near, key=lambda w: (abs(params(w) - target), w))
    return width, params(width)


def removed_importance(mlp: list[Group], heads: list[Group], scores: dict[str, torch.Tensor], widths: Widths) -> float:
    """Total score of the units that `widths` would remove in every layer."""
    keep, keep_nested = select_units(mlp, heads, scores, widths)
    lost = 0.0
    for g in (*mlp, *heads):
        kept_outer = keep.get(g.name, list(range(g.size)))
        lost += float(scores[g.name].sum() - scores[g.name][kept_outer].sum())
        if g.nested is not None and g.nested.name in keep_nested:
            nested_scores = scores[g.nested.name]
            for outer in kept_outer:
                row = nested_scores[outer]
                lost += float(row.sum() - row[keep_nested[g.nested.name][outer]].sum())
    return lost


def select_units(mlp: list[Group], heads: list[Group], scores: dict[str, torch.Tensor],
                 widths: Widths) -> tuple[dict[str, list[int]], dict[str, list[list[int]]]]:
    """Pick the highest-scoring units in every layer for the given uniform widths."""
    keep: dict[str, list[int]] = {}
    keep_nested: dict[str, list[list[int]]] = {}
    for g in mlp:
        if widths.mlp is not None and widths.mlp < g.size:
            keep[g.name] = top_k(scores[g.name], widths.mlp)
    for g in heads:
        if widths.kv is not None and widths.kv < g.size:
            keep[g.name] = top_k(scores[g.name], widths.kv)
        if g.nested is not None and widths.q_per_kv is not None and widths.q_per_kv < g.nested.size:
            keep_nested[g.nested.name] = [top_k(row, widths.q_per_kv) for row in scores[g.nested.name]]
    return keep, keep_nested


def plan_depth(counter: ParamCounter, layer_scores: torch.Tensor, ratio: float, contiguous: bool = False,
               angular: Callable[[int], torch.Tensor] | None = None, count: int | None = None) -> list[int]:
    """Decoder layers to remove: as many as fit in the budget (at least one layer kept).

    `layer_scores` (Block Influence) picks the lowest-scoring layers; with `contiguous`, `angular(n)` gives the
    distance of every n-layer block and the block with the smallest one goes.
    """
    layers = len(layer_scores)
    if count is not None:  # --layers-removed N
        if count >= layers:
            raise UserError(f"--layers-removed {count}: the model has {layers} layers; keep at least one")
        return _depth_choice(layer_scores, count, contiguous, angular)
    total = counter.count({}, removed_layers=frozenset())
    budget = total * (ratio + RATIO_TOLERANCE)
    count = 0
    while count + 1 < layers:
        candidate = _depth_choice(layer_scores, count + 1, contiguous, angular)
        if total - counter.count({}, removed_layers=frozenset(candidate)) > budget:
            break
        count += 1
    if count == 0:
        raise UserError(f"ratio {ratio} is smaller than one decoder layer; use --schedule uniform")
    return _depth_choice(layer_scores, count, contiguous, angular)


def _depth_choice(layer_scores: torch.Tensor, count: int, contiguous: bool, angular) -> list[int]:
    if contiguous:
        distances = angular(count)
        start = int(torch.argmin(distances))
        return list(range(start, start + count))
    return sorted(top_k(-layer_scores, count))
