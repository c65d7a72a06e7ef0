"""The level database of `--schedule search`: each layer's allowed widths with their exact parameter savings (from
ParamCounter), the uniform plan as a start profile, and a profile back to kept units (the estimator's top scores)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from depgraph_llm.errors import UserError
from depgraph_llm.graph.coupling import CouplingGraph
from depgraph_llm.graph.groups import Group, GroupKind
from depgraph_llm.planning.budget import Allocation, ParamCounter, Widths, top_k, width_candidates
from depgraph_llm.planning.search import Budget, HeadLevel, LayerLevels, Profile

COARSE_LEVELS = 16  # a mutation moves an MLP width by about 1/16 of it; the repair lands with single steps
BAND = 0.001        # candidates may have up to this fraction of the model's parameters fewer than the budget


@dataclass(frozen=True)
class LayerGroups:
    """The searched groups of one decoder layer."""

    layer: int
    mlp: Group | None
    heads: Group | None


def searched_layers(coupling: CouplingGraph) -> list[LayerGroups]:
    """Per decoder layer its MLP channel group and attention group (refused for models the search cannot mask)."""
    if coupling.of_kind(GroupKind.EXPERT_CHANNELS) or coupling.of_kind(GroupKind.EXPERTS):
        raise UserError("--schedule search does not search mixtures of experts yet; use --schedule uniform")
    layers = sorted(g.layer for g in coupling.of_kind(GroupKind.LAYER))
    if not layers:
        raise UserError("--schedule search needs a decoder-layer list; use --schedule uniform")
    mlp = {g.layer: g for g in coupling.of_kind(GroupKind.CHANNELS) if g.layer is not None}
    heads = {g.layer: g for g in coupling.of_kind(GroupKind.HEADS) if g.layer is not None}
    return [LayerGroups(i, mlp.get(i), heads.get(i)) for i in layers]


def head_kept(group: Group, level: HeadLevel) -> dict[str, int]:
    """Counts kept for an attention level: KV groups (or heads), and query heads per KV group if nested."""
    kv, q = level
    kept = {group.name: kv}
    if group.nested is not None:
        kept[group.nested.name] = q
    return kept


def _head_levels(group: Group, allocation: Allocation, is_valid: Callable[[Widths], bool]) -> list[HeadLevel]:
    q_size = group.nested.size if group.nested is not None else None
    q_total = group.size * (q_size or 1)
    levels = [(kv, q) for kv in range(1, group.size + 1) for q in (range(1, q_size + 1) if q_size else [None])]
    allowed = [lv for lv in levels if allocation.accepts(Widths(None, *lv), q_total) and is_valid(Widths(None, *lv))]
    return allowed or [(group.size, q_size)]


def level_database(layers: list[LayerGroups], counter: ParamCounter, round_to: int, allocation: Allocation,
                   is_valid: Callable[[Widths], bool]) -> list[LayerLevels]:
    """Every layer's allowed MLP widths and attention levels with the parameters each removes (exact counts)."""
    full = counter.count({})
    database = []
    for lg in layers:
        if lg.mlp is None:
            widths: list[int | None] = [None]
        elif allocation.mlp_ratio is not None:
            widths = [allocation.mlp_width(lg.mlp.size, round_to)]
        else:
            widths = width_candidates(lg.mlp.size, round_to)
        mlp_saving = [0 if w is None else full - counter.count({lg.mlp.name: w}) for w in widths]
        head_levels = _head_levels(lg.heads, allocation, is_valid) if lg.heads is not None else [(None, None)]
        head_saving = [0 if lv[0] is None else full - counter.count(head_kept(lg.heads, lv)) for lv in head_levels]
        order = sorted(range(len(head_levels)), key=lambda k: (-head_saving[k], head_levels[k]))
        drop = full - counter.count({}, removed_layers=frozenset({lg.layer}))
        database.append(LayerLevels(
            layer=lg.layer, mlp=tuple(widths), mlp_saving=tuple(mlp_saving),
            heads=tuple(head_levels[k] for k in order), head_saving=tuple(head_saving[k] for k in order),
            drop_saving=drop, coarse=max(1, len(widths) // COARSE_LEVELS)))
    return database


def uniform_profile(layers: list[LayerGroups], levels: list[LayerLevels], keep: dict[str, list[int]],
                    keep_nested: dict[str, list[list[int]]]) -> Profile:
    """The uniform plan's widths as a profile (the search's start)."""
    mlp, heads = [], []
    for lg, lv in zip(layers, levels):
        width = None if lg.mlp is None else len(keep.get(lg.mlp.name, range(lg.mlp.size)))
        level: HeadLevel = (None, None)
        if lg.heads is not None:
            nested = lg.heads.nested
            q = None if nested is None else len(keep_nested.get(nested.name, [range(nested.size)])[0])
            level = (len(keep.get(lg.heads.name, range(lg.heads.size))), q)
        if width not in lv.mlp or level not in lv.heads:
            raise UserError(f"the uniform plan's widths in layer {lg.layer} are not search levels; pass another "
                            "--round-to or use --schedule uniform")
        mlp.append(lv.mlp.index(width))
        heads.append(lv.heads.index(level))
    return Profile(tuple(mlp), tuple(heads), tuple(False for _ in layers))


def budget_band(full: int, reference: int, ratio: float, uniform_params: int, smallest_step: int) -> Budget:
    """Counts from just under the lower of (target, uniform plan) up to the higher of them; at least one MLP step
    wide so the repair can land. `full` is the counter's own total (the budget is relative to `reference`)."""
    target = round(reference * (1.0 - ratio))
    high = max(target, uniform_params)
    low = min(target, uniform_params) - max(round(BAND * reference), 2 * smallest_step)
    return Budget(full=full, low=low, high=high)


def profile_keep(layers: list[LayerGroups], levels: list[LayerLevels], profile: Profile,
                 scores: dict[str, torch.Tensor]) -> tuple[dict[str, list[int]], dict[str, list[list[int]]], list[int]]:
    """Kept units (top scores) of every searched group, and the dropped layers: (keep, keep_nested, removed)."""
    keep: dict[str, list[int]] = {}
    keep_nested: dict[str, list[list[int]]] = {}
    removed = []
    for lg, lv, m, h, gone in zip(layers, levels, profile.mlp, profile.heads, profile.dropped):
        if gone:
            removed.append(lg.layer)
            continue
        width = lv.mlp[m]
        if lg.mlp is not None and width < lg.mlp.size:
            keep[lg.mlp.name] = top_k(scores[lg.mlp.name], width)
        kv, q = lv.heads[h]
        if lg.heads is not None and kv < lg.heads.size:
            keep[lg.heads.name] = top_k(scores[lg.heads.name], kv)
        nested = lg.heads.nested if lg.heads is not None else None
        if nested is not None and q < nested.size:
            keep_nested[nested.name] = [top_k(row, q) for row in scores[nested.name]]
    return keep, keep_nested, removed


def profile_record(levels: list[LayerLevels], profile: Profile) -> list[dict]:
    """The profile as prune_plan.json rows: per layer its MLP width, KV groups, query heads per group, dropped."""
    rows = []
    for lv, m, h, gone in zip(levels, profile.mlp, profile.heads, profile.dropped):
        kv, q = lv.heads[h]
        rows.append({"layer": lv.layer, "dropped": gone, **({} if gone else
                     {"mlp": lv.mlp[m], "kv_groups": kv, "q_per_kv": q})})
    return rows
