"""FX trace -> coupling graph (networkx) -> groups of prunable units.

Nodes of the graph are parameter axes ("model.layers.0.mlp.up_proj.weight", 0). Two axes are joined by an edge
when tracing found that some factor of one must be indexed like some factor of the other; the edge records
the mapping: "identity" (whole axis to whole axis), "block" (one axis is split into heads x head_dim) or
"repeat" (GQA: a KV head serves several query heads). Connected components become groups.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx
from torch import nn

from depgraph_llm.graph.groups import NAME_SUFFIX, Group, GroupKind, Slice
from depgraph_llm.graph.propagate import Propagation, propagate
from depgraph_llm.graph.trace import Trace, trace_model

log = logging.getLogger(__name__)


@dataclass
class CouplingGraph:
    """The coupling graph of one model and the groups cut from it."""

    graph: nx.Graph
    groups: list[Group]
    layers_path: str | None
    trace_seconds: float
    frozen_ops: list[str] = field(default_factory=list)
    experts_per_token: int | None = None  # mixture of experts: the config's num_experts_per_tok (top-k)

    def by_name(self) -> dict[str, Group]:
        return {g.name: g for g in self.groups}

    def of_kind(self, kind: GroupKind) -> list[Group]:
        return [g for g in self.groups if g.kind == kind]


def find_layers_path(model: nn.Module) -> str | None:
    """The ModuleList holding the decoder blocks: the one with the most parameters."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(p.numel() for p in module.parameters())
            if count > best_count:
                best, best_count = name, count
    return best


def canonical_param_names(model: nn.Module) -> dict[str, str]:
    """Map every name of a parameter (tied weights have several) to the first name PyTorch reports for it."""
    first: dict[int, str] = {}
    canonical = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        canonical[name] = first.setdefault(id(param), name)
    return canonical


def build_coupling(model: nn.Module, trace: Trace | None = None) -> CouplingGraph:
    """Trace `model` (unless a trace is given) and derive its coupling graph and groups."""
    trace = trace or trace_model(model)
    canonical = canonical_param_names(model)
    param_names = {node: canonical.get(name, name) for node, name in trace.param_names.items()}
    prop = propagate(trace.graph, param_names)
    layers_path = find_layers_path(model)
    embedding_params = {param_names[n] for n in prop.embedding_params if n in param_names}
    slices_by_class, graph = _collect_slices(prop)
    output_classes = {prop.atoms.find(leaf) for atom in prop.output_atoms for leaf in prop.atoms.leaves(atom)}
    routed = {prop.atoms.find(atom) for atom in prop.routed_atoms}
    groups = _cut_groups(prop, slices_by_class, graph, layers_path, embedding_params, output_classes, routed)
    _mark_expert_channels(groups)
    groups = [g for g in groups if g.kind != GroupKind.VOCAB or _is_token_rows(g, model, canonical)]
    for group in groups:
        if group.kind == GroupKind.HEADS and group.nested is None:
            group.queries_per_unit = _queries_per_unit(model, group, layers_path)
    groups += _layer_groups(model, layers_path)
    top_k = getattr(model.config, "num_experts_per_tok", None) if hasattr(model, "config") else None
    return CouplingGraph(graph, groups, layers_path, trace.seconds, sorted(prop.unknown_ops),
                         top_k if isinstance(top_k, int) else None)


def module_path_of(short: str, layers_path: str | None) -> str:
    """The module path behind a group-name prefix: "layers.3.self_attn" -> "model.layers.3.self_attn"."""
    if layers_path and short.startswith("layers."):
        return layers_path + short[len("layers"):]
    return short


def _queries_per_unit(model: nn.Module, group: Group, layers_path: str | None) -> int:
    """Query heads per unit of a heads group without a nested group: 1 for multi-head attention, more when the
    model keeps each KV group's queries whole (Falcon): the attention module's or the config's head count over
    the group size."""
    try:
        attention = model.get_submodule(module_path_of(group.name.rsplit(".", 1)[0], layers_path))
    except AttributeError:
        attention = None
    heads = next((v for v in (getattr(attention, a, None) for a in ("num_heads", "num_attention_heads"))
                  if isinstance(v, int)), None)
    heads = heads or getattr(getattr(attention, "config", model.config), "num_attention_heads", None)
    return heads // group.size if isinstance(heads, int) and heads % group.size == 0 and heads > group.size else 1


def _is_token_rows(group: Group, model: nn.Module, canonical: dict[str, str]) -> bool:
    """Vocabulary rows are those of the token embedding or the LM head; rows of a learned position table
    (GPT-2, OPT) are indexed by position and are never pruned."""
    names = {id(p): n for n, p in model.named_parameters()}
    token = set()
    getters = (getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None))
    for module in (getter() for getter in getters if getter is not None):
        weight = getattr(module, "weight", None)
        if weight is not None and id(weight) in names:
            token.add(canonical.get(names[id(weight)], names[id(weight)]))
    return any(s.param in token for s in group.slices)


def _collect_slices(prop: Propagation) -> tuple[dict[int, list[tuple]], nx.Graph]:
    """For every atom class, the (param, axis, factors, position, offset, extent) places where it appears; offset
    and extent locate a segment of a fused axis (0 and the axis length otherwise)."""
    atoms = prop.atoms
    by_class: dict[int, list[tuple]] = defaultdict(list)
    graph = nx.Graph()
    for atom in prop.param_axes.values():  # a factor cut into segments (split after a reshape): not expressible
        for _, segment in atoms.segment_leaves(atom):
            for leaf in atoms.leaves(segment):
                if leaf in atoms.segments:
                    atoms.mark_atomic(leaf)
    for (param, axis), atom in prop.param_axes.items():
        extent = atoms.size[atoms.find(atom)]
        segments = atoms.segment_leaves(atom)
        graph.add_node((param, axis), size=extent,
                       factors=tuple(tuple(atoms.size[leaf] for leaf in atoms.leaves(seg)) for _, seg in segments))
        for offset, segment in segments:
            leaves = atoms.leaves(segment)
            factors = tuple(atoms.size[leaf] for leaf in leaves)
            for position, leaf in enumerate(leaves):
                by_class[atoms.find(leaf)].append((param, axis, factors, position, offset, extent))
    for root, places in by_class.items():
        mapping = "repeat" if atoms.is_repeat[root] else "identity"
        for i in range(1, len(places)):
            a, b = places[0], places[i]
            if mapping == "identity" and (len(a[2]) > 1 or len(b[2]) > 1):
                mapping = "block"
            if a[:2] != b[:2]:
                graph.add_edge(a[:2], b[:2], mapping=mapping, atom_class=root, atomic=atoms.atomic[root])
    return by_class, graph


def _cut_groups(prop, slices_by_class, graph, layers_path, embedding_params, output_classes,
                routed: set[int] = frozenset()) -> list[Group]:
    atoms = prop.atoms
    groups: list[Group] = []
    roots_by_component: dict[frozenset, list[int]] = defaultdict(list)
    component_of = {}
    for component in nx.connected_components(graph):
        key = frozenset(component)
        for node in component:
            component_of[node] = key
    for root, places in slices_by_class.items():
        roots_by_component[component_of[places[0][:2]]].append(root)
    for component, roots in roots_by_component.items():
        free = [r for r in roots if not atoms.atomic[r]]
        repeats = [r for r in free if atoms.is_repeat[r] and atoms.size[r] > 1]
        outers = [r for r in free if not atoms.is_repeat[r] and not _within_head(slices_by_class[r]) and (
            atoms.size[r] > 1 or any(_nested_in(slices_by_class[n], r, slices_by_class[r]) for n in repeats))]
        for root in outers:
            group = _make_group(root, slices_by_class[root], atoms, layers_path, embedding_params,
                                root in output_classes, root in routed)
            nested = [r for r in repeats if _nested_in(slices_by_class[r], root, slices_by_class[root])]
            if nested and group.kind == GroupKind.HEADS:
                group.nested = _make_nested(group, nested[0], slices_by_class[nested[0]], slices_by_class[root])
            groups.append(group)
    _make_names_unique(groups)
    return sorted(groups, key=lambda g: (g.layer if g.layer is not None else -1, g.kind.value, g.name))


def _make_names_unique(groups: list[Group]) -> None:
    """Plans refer to groups by name: two groups in one module (Mamba's x_proj feeds a state-size and a dt-rank
    group) are told apart by their first member, e.g. `layers.0.mixer.channels[dt_proj.weight:1@0]`."""
    by_name: dict[str, list[Group]] = defaultdict(list)
    for group in groups:
        by_name[group.name].append(group)
    for name, clashing in by_name.items():
        if len(clashing) < 2:
            continue
        for group in clashing:
            first = group.slices[0]
            group.name = f"{name}[{'.'.join(first.param.split('.')[-2:])}:{first.axis}@{first.offset}]"
        if len({g.name for g in clashing}) < len(clashing):
            for index, group in enumerate(sorted(clashing, key=lambda g: g.slices)):
                group.name = f"{name}[{index}]"
        for group in clashing:
            if group.nested is not None:
                group.nested.name = group.name + ".query_per_kv"


def _within_head(places) -> bool:
    """Units that are channels inside every head (the innermost factor of a heads x head_dim axis, e.g. the value
    dims of a multi-query head that is never reshaped): one head_dim for all heads is a config constant."""
    return any(len(factors) > 1 and position == len(factors) - 1 for _, _, factors, position, _, _ in places)


def _make_group(root, places, atoms, layers_path, embedding_params, is_output, is_routed=False) -> Group:
    slices = tuple(sorted(Slice(p, a, f, pos, None, off, ext) for p, a, f, pos, off, ext in places))
    kind = GroupKind.CHANNELS
    if is_routed:  # the axis routing indices point into: experts
        kind = GroupKind.EXPERTS
    elif is_output or any(s.param in embedding_params and s.axis == 0 for s in slices):
        kind = GroupKind.VOCAB
    elif any(s.param in embedding_params and s.axis == 1 for s in slices):
        kind = GroupKind.HIDDEN
    elif any(len(s.factors) > 1 for s in slices):
        kind = GroupKind.HEADS
    unit_width = min((_inner_width(s) for s in slices), default=1)
    layer, name = _name_for(slices, kind, layers_path)
    return Group(name=name, kind=kind, size=atoms.size[root], slices=slices, layer=layer, unit_width=unit_width)


def _inner_width(s: Slice) -> int:
    width = 1
    for size in s.factors[s.factor + 1:]:
        width *= size
    return width


def _nested_in(repeat_places, outer_root, outer_places) -> bool:
    outer_at = {(p, a, off): pos for p, a, _, pos, off, _ in outer_places}
    return all(outer_at.get((p, a, off)) == pos - 1 for p, a, _, pos, off, _ in repeat_places)


def _make_nested(outer: Group, root, places, outer_places) -> Group:
    outer_at = {(p, a, off): pos for p, a, _, pos, off, _ in outer_places}
    slices = tuple(sorted(Slice(p, a, f, pos, outer_at[(p, a, off)], off, ext) for p, a, f, pos, off, ext in places))
    size = slices[0].factors[slices[0].factor]
    return Group(name=outer.name + ".query_per_kv", kind=GroupKind.HEADS, size=size, slices=slices,
                 layer=outer.layer, unit_width=outer.unit_width)


def _name_for(slices, kind: GroupKind, layers_path: str | None) -> tuple[int | None, str]:
    if kind == GroupKind.HIDDEN:
        return None, kind.value
    modules = [s.param.rsplit(".", 1)[0].split(".") for s in slices]
    common = []
    for parts in zip(*modules):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    path = ".".join(common)
    layer = None
    if layers_path and path.startswith(layers_path + "."):
        match = re.match(r"(\d+)(?:\.(.*))?$", path[len(layers_path) + 1:])
        if match:
            layer = int(match.group(1))
            path = f"layers.{layer}" + (f".{match.group(2)}" if match.group(2) else "")
    suffix = NAME_SUFFIX.get(kind, "channels")
    return layer, f"{path}.{suffix}" if path else suffix


def _mark_expert_channels(groups: list[Group]) -> None:
    """Channel groups inside fused expert tensors (an axis of a parameter whose other axis is an experts group)
    are the experts' shared intermediate width: one width for every expert of the layer."""
    expert_params = {s.param for g in groups if g.kind == GroupKind.EXPERTS for s in g.slices}
    for group in groups:
        if group.kind == GroupKind.CHANNELS and any(s.param in expert_params for s in group.slices):
            group.kind = GroupKind.EXPERT_CHANNELS


def _layer_groups(model: nn.Module, layers_path: str | None) -> list[Group]:
    if layers_path is None:
        return []
    layers = model.get_submodule(layers_path)
    groups = []
    for index, block in enumerate(layers):
        params = tuple(f"{layers_path}.{index}.{n}" for n, _ in block.named_parameters())
        groups.append(Group(name=f"layers.{index}", kind=GroupKind.LAYER, size=1, layer=index,
                            module=f"{layers_path}.{index}", params=params))
    return groups
