"""Coupling rules for routed experts: routing indices carry the expert axis they point into.

A router's `topk` over its expert axis E yields indices whose *values* enumerate E. Such a tensor gets a *value
atom* (`Propagation.value_atoms`): reshapes, dtype moves and `sort` keep it; indexing a parameter with it
(`gate_up_proj[expert_ids]`, the batched_mm experts), or counting it into E bins (`histc`, whose prefix sums are
the group offsets of `grouped_mm`), unifies E with the indexed axis. Atoms reached that way are *routed*: their
classes become `experts` groups (router row e + slice e of every expert tensor).
"""
from __future__ import annotations

import operator

import torch
from torch.fx import Node

from depgraph_llm.graph import op_rules
from depgraph_llm.graph.op_rules import Syms, _contract, _dim, register, tensor_shape

aten = torch.ops.aten

# Ops whose output values are their first input's values (so an index tensor stays an index tensor).
VALUE_PRESERVING_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default,
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default,
    aten.clamp.default, aten.clamp_.default, aten.clamp_max.default, aten.clamp_min.default,
}


def carry_value_atom(p, node: Node) -> None:
    """After a value-preserving op, the output indexes what its first input indexes."""
    if node.target in VALUE_PRESERVING_OPS and node.args and isinstance(node.args[0], Node):
        atom = p.value_atoms.get(node.args[0].name)
        if atom is not None and not isinstance(atom, list):
            p.value_atoms[node.name] = atom


def _routed(p, sym) -> None:
    for atom in sym or ():
        p.routed_atoms.add(atom)


@register(aten.topk.default)
def _topk(p, node: Node) -> list[Syms | None]:
    """Values and indices of the k largest entries along `dim`: that dim becomes the k picks (a data axis); the
    indices' values point into the symbol the dim had (the router's expert axis)."""
    syms, shape = p.of(node.args[0]), tensor_shape(node.args[0])
    if syms is None:
        return [p.data_syms(node.args[0])] * 2
    dim = _dim(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1), len(shape))
    out = list(syms)
    out[dim] = None
    p.value_atoms[node.name] = [None, syms[dim]]
    return [out, list(out)]


@register(aten.sort.default, aten.sort.stable)
def _sort(p, node: Node) -> list[Syms | None]:
    """Sorting permutes `dim`: channels there are frozen; sorted routing indices still point at experts."""
    syms, shape = p.of(node.args[0]), tensor_shape(node.args[0])
    if syms is None:
        return [p.data_syms(node.args[0])] * 2
    dim_arg = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 and isinstance(node.args[1], int) else -1)
    dim = _dim(dim_arg, len(shape))
    p.freeze([syms[dim]])
    out = list(syms)
    out[dim] = None
    value = p.value_atoms.get(node.args[0].name)
    p.value_atoms[node.name] = [value if not isinstance(value, list) else None, None]
    return [out, list(out)]


@register(aten.histc.default)
def _histc(p, node: Node) -> Syms | None:
    """Counts of routing indices per expert: bin e is expert e (grouped_mm's token counts per expert)."""
    value = p.value_atoms.get(node.args[0].name) if isinstance(node.args[0], Node) else None
    bins = tensor_shape(node)[0]
    if value is None or isinstance(value, list) or p.atoms.size[p.atoms.find(value[0])] != bins or len(value) != 1:
        return p.fallback(node)
    _routed(p, value)
    return [value]


@register(aten.cumsum.default)
def _cumsum(p, node: Node) -> Syms | None:
    """Prefix sums over a routed axis (group offsets from per-expert counts) keep the axis; over any other
    channel axis they mix channels, which freezes them."""
    syms, shape = p.of(node.args[0]), tensor_shape(node.args[0])
    if syms is None:
        return p.data_syms(node)
    dim = _dim(node.args[1], len(shape))
    if syms[dim] is not None and not _is_routed(p, syms[dim]):
        p.freeze([syms[dim]])
        out = list(syms)
        out[dim] = op_rules._frozen_dim(p, syms[dim], shape[dim])
        return out
    return list(syms)


def _is_routed(p, sym) -> bool:
    roots = {p.atoms.find(a) for a in p.routed_atoms}
    return all(p.atoms.find(a) in roots for a in sym)


@register(aten.repeat_interleave.self_int)
def _repeat_interleave(p, node: Node) -> Syms | None:
    """Each token repeated k times (batched_mm experts): the repeated dim is a data axis; a channel axis there
    would be permuted, so it is frozen. The other dims pass through."""
    syms, shape = p.of(node.args[0]), tensor_shape(node.args[0])
    dim_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if syms is None:
        return p.data_syms(node)
    if dim_arg is None:
        p.freeze(syms)
        return p.data_syms(node)
    dim = _dim(dim_arg, len(shape))
    out = list(syms)
    if syms[dim] is not None:
        out[dim] = op_rules._frozen_dim(p, syms[dim], tensor_shape(node)[dim])
    return out


def _grouped_mm(p, node: Node) -> Syms | None:
    """input [S, K] times per-group weights [E, K, N] with group offsets [E]: K is contracted, E is the weight's
    expert axis and the offsets' (counts per expert), N is the output's channel axis."""
    x, weight = p.of(node.args[0]), p.of(node.args[1])
    offs_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")
    offs = p.of(offs_arg)
    x = x if x is not None else p.data_syms(node.args[0])
    if weight is None or x is None or len(weight) != 3 or len(x) != 2:
        return p.fallback(node)
    _contract(p, x[-1], weight[-2])
    if offs is not None and offs[0] is not None and weight[0] is not None:
        p.atoms.unify_dims(offs[0], weight[0])
    else:
        p.freeze([weight[0]])
    return [x[0], weight[-1]]


register(aten._grouped_mm.default)(_grouped_mm)
try:  # registered when transformers.integrations.moe is imported (it always is with an MoE model)
    import transformers.integrations.moe  # noqa: F401

    register(torch.ops.transformers.grouped_mm_fallback.default)(_grouped_mm)
except (ImportError, AttributeError, RuntimeError):
    pass


_plain_index = op_rules.OP_HANDLERS[aten.index.Tensor]


@register(aten.index.Tensor)
def _index(p, node: Node) -> Syms | None:
    """x[idx] where idx holds routing indices: the indexed axis is the expert axis (unified with the router's)
    and becomes the token axis of the output. Any other indexing follows the plain rule."""
    syms, shape, out_shape = p.of(node.args[0]), tensor_shape(node.args[0]), tensor_shape(node)
    indices = list(node.args[1])
    used = [i for i, index in enumerate(indices) if index is not None]
    if syms is None or len(used) != 1 or not isinstance(indices[used[0]], Node):
        return _plain_index(p, node)
    dim, index = used[0], indices[used[0]]
    value = p.value_atoms.get(index.name)
    index_shape = tensor_shape(index)
    if value is None or isinstance(value, list) or syms[dim] is None or index_shape is None:
        return _plain_index(p, node)
    if len(out_shape) != len(shape) - 1 + len(index_shape):
        return _plain_index(p, node)
    p.atoms.unify_dims(value, syms[dim])
    _routed(p, syms[dim])
    return [*syms[:dim], *([None] * len(index_shape)), *syms[dim + 1:]]


_plain_getitem = op_rules.OP_HANDLERS[operator.getitem]


@register(operator.getitem)
def _getitem(p, node: Node) -> Syms | None:
    """One output of a multi-output op; its value atom (topk's indices) comes along."""
    values = p.value_atoms.get(node.args[0].name) if isinstance(node.args[0], Node) else None
    if isinstance(values, list) and isinstance(node.args[1], int) and node.args[1] < len(values):
        if values[node.args[1]] is not None:
            p.value_atoms[node.name] = values[node.args[1]]
    return _plain_getitem(p, node)
