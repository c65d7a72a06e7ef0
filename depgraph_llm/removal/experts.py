"""Mixture-of-experts bookkeeping after slicing: expert counts, expert widths and top-k, on modules and config.

Slicing the fused expert tensors and the router rows is the generic remover's job (apply.py); what remains is
data the modeling code keeps beside the weights: `num_experts` (histc bins, one-hot classes), `top_k` (at most the
experts left) and the experts' intermediate width, on every module of the MoE block, and the matching config
fields named by the architecture's `ArchSpec`.
"""
from __future__ import annotations

from torch import nn

from depgraph_llm.graph.coupling import CouplingGraph, module_path_of
from depgraph_llm.graph.groups import GroupKind
from depgraph_llm.models import ArchSpec
from depgraph_llm.planning.plan import PrunePlan


def moe_module(group_name: str) -> str:
    """The MoE block's short path from an experts group name: "layers.0.mlp.experts" -> "layers.0.mlp"."""
    return group_name.rsplit(".", 1)[0]


def expert_counts(coupling: CouplingGraph, plan: PrunePlan) -> dict[int, dict[str, int | str]]:
    """Per layer with routed experts: experts kept and the experts' intermediate width kept."""
    counts: dict[int, dict] = {}
    for group in coupling.groups:
        if group.layer is None or group.kind not in (GroupKind.EXPERTS, GroupKind.EXPERT_CHANNELS):
            continue
        row = counts.setdefault(group.layer, {})
        kept = len(plan.keep.get(group.name, range(group.size)))
        if group.kind == GroupKind.EXPERTS:
            row.update(experts=kept, module=moe_module(group.name))
        else:
            row["expert_mlp"] = kept
    return counts


def dense_top_k(config, spec: ArchSpec) -> int | None:
    value = getattr(config, spec.top_k_field, None) if spec.top_k_field else None
    return value if isinstance(value, int) else None


def fix_expert_attrs(model: nn.Module, coupling: CouplingGraph, plan: PrunePlan, spec: ArchSpec) -> None:
    """Set the MoE block's expert count, top-k (clipped to the experts left) and expert width attributes."""
    top_k = dense_top_k(model.config, spec)
    hidden = coupling.of_kind(GroupKind.HIDDEN)
    hidden_kept = len(plan.keep[hidden[0].name]) if hidden and hidden[0].name in plan.keep else None
    for counts in expert_counts(coupling, plan).values():
        if "module" not in counts:
            continue
        try:
            block = model.get_submodule(module_path_of(counts["module"], coupling.layers_path))
        except AttributeError:
            continue
        values = dict(counts)
        if top_k is not None:
            values["top_k"] = min(top_k, counts["experts"])
        if hidden_kept is not None:  # the router reshapes its input to (-1, hidden_dim)
            values["hidden"] = hidden_kept
        for module in block.modules():
            for attr, which in spec.expert_attrs.items():
                if which in values and isinstance(getattr(module, attr, None), int) and not isinstance(
                        getattr(module, attr), bool):
                    setattr(module, attr, values[which])


def clip_top_k(config, spec: ArchSpec, widths: list[dict]) -> None:
    """Experts used per token never exceed the experts a layer has left."""
    top_k = dense_top_k(config, spec)
    left = [row["experts"] for row in widths if "experts" in row]
    if top_k is not None and left and min(left) < top_k:
        setattr(config, spec.top_k_field, min(left))
