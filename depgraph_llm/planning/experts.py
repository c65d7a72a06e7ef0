"""Active parameters of a mixture of experts: routed experts cost memory, but a token only runs top-k of them."""
from __future__ import annotations

from depgraph_llm.graph.coupling import CouplingGraph
from depgraph_llm.graph.groups import GroupKind
from depgraph_llm.planning.budget import ParamCounter
from depgraph_llm.planning.plan import PrunePlan


def traced_shapes(coupling: CouplingGraph) -> dict[str, tuple[int, ...]]:
    """Dense parameter shapes from the coupling graph's (parameter, axis) nodes."""
    axes: dict[str, dict[int, int]] = {}
    for (param, axis), data in coupling.graph.nodes(data=True):
        axes.setdefault(param, {})[axis] = int(data["size"])
    return {param: tuple(sizes[a] for a in sorted(sizes)) for param, sizes in axes.items()}


def expert_tensors(coupling: CouplingGraph) -> dict[str, set[str]]:
    """Per experts group, its per-expert tensors (those that also run along the experts' channels, or are 3-D):
    the router, which every token runs, is not one of them."""
    shapes = traced_shapes(coupling)
    channel_params = {s.param for g in coupling.of_kind(GroupKind.EXPERT_CHANNELS) for s in g.slices}
    return {g.name: {s.param for s in g.slices if s.param in channel_params or len(shapes.get(s.param, ())) >= 3}
            for g in coupling.of_kind(GroupKind.EXPERTS)}


def active_parameters(coupling: CouplingGraph, plan: PrunePlan | None = None) -> tuple[int, int] | None:
    """(total, active per token) after `plan` (dense without one); None for a model without routed experts."""
    groups = coupling.of_kind(GroupKind.EXPERTS)
    top_k = coupling.experts_per_token
    if not groups or not isinstance(top_k, int):
        return None
    plan = plan or PrunePlan("", "", "", "", 0, 0.0, 1, 1, 1)
    counter = ParamCounter(traced_shapes(coupling), coupling, frozenset(plan.removed_layers))
    kept = {name: len(units) for name, units in plan.keep.items()}
    kept.update({name: len(rows[0]) for name, rows in plan.keep_nested.items() if rows})
    total = counter.count(kept)
    tensors = expert_tensors(coupling)
    inactive = 0
    for group in groups:
        if group.layer in plan.removed_layers:
            continue
        experts = kept.get(group.name, group.size)
        routed = counter.count(kept, only=tensors[group.name])
        inactive += routed // experts * (experts - min(top_k, experts))
    return total, total - inactive


def moe_report(coupling: CouplingGraph, plan: PrunePlan) -> dict:
    """Report fields for a mixture of experts: active parameters (per token) before and after, and their ratio."""
    before, after = active_parameters(coupling), active_parameters(coupling, plan)
    if before is None or after is None:
        return {}
    return {"active_params_before": before[1], "active_params_after": after[1],
            "active_ratio_achieved": round(1.0 - after[1] / before[1], 6)}
