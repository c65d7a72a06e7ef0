"""Coupling rules: one handler per ATen op family, registered in OP_HANDLERS.

A handler receives the running `Propagation` and an FX node; it unifies the dimension symbols of the node's
inputs that must share indices and returns the symbols of the node's output.
"""
from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch.fx import Node

from depgraph_llm.graph.symbols import AtomTable, DimSym

aten = torch.ops.aten

Syms = list[DimSym]
Handler = Callable[[object, Node], object]
OP_HANDLERS: dict[object, Handler] = {}

# Ops that change nothing about channel identity (elementwise math, dtype/device moves, copies).
PASS_THROUGH_OPS = {
    aten.neg.default, aten.silu.default, aten.gelu.default, aten.relu.default, aten.tanh.default,
    aten.sigmoid.default, aten.exp.default, aten.cos.default, aten.sin.default, aten.rsqrt.default,
    aten.sqrt.default, aten.abs.default, aten.pow.Tensor_Scalar, aten.contiguous.default,
    aten.clone.default, aten.alias.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
    aten._to_copy.default, aten.dropout.default, aten.detach.default, aten.type_as.default,
    aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten.erf.default, aten.lift_fresh_copy.default,
    aten.gelu_.default, aten.silu_.default, aten.relu_.default, aten.tanh_.default,
}
# Ops that permute or gather along a dimension: channels there cannot be pruned independently.
FREEZING_OPS = {aten.roll.default, aten.flip.default, aten.index.Tensor, aten.gather.default,
                aten.index_select.default, aten.repeat.default, aten.repeat_interleave.self_int,
                aten.repeat_interleave.self_Tensor, aten.unbind.int}
NO_TENSOR_OPS = {aten._assert_tensor_metadata.default, aten.sym_size.int, aten._assert_scalar.default,
                 aten.sym_constrain_range_for_size.default}


def register(*ops: object) -> Callable[[Handler], Handler]:
    """Decorator: register a handler for one or more ATen overloads."""
    def wrap(fn: Handler) -> Handler:
        for op in ops:
            OP_HANDLERS[op] = fn
        return fn
    return wrap


def tensor_shape(node: object) -> tuple[int, ...] | None:
    value = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(int(s) for s in value.shape) if isinstance(value, torch.Tensor) else None



def flat_args(node: Node) -> list[object]:
    flat: list[object] = []
    for arg in (*node.args, *node.kwargs.values()):
        flat.extend(arg if isinstance(arg, (list, tuple)) else [arg])
    return flat


def broadcastable(shape: tuple[int, ...] | None, out: tuple[int, ...]) -> bool:
    if shape is None or len(shape) > len(out):
        return False
    return all(s in (1, o) for s, o in zip(shape, out[len(out) - len(shape):]))


def is_elementwise(node: Node) -> bool:
    tags = getattr(node.target, "tags", ())
    return torch.Tag.pointwise in tags


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _contract(p, left: DimSym, right: DimSym) -> None:
    """Two dims a contraction sums over are indexed alike. When one carries no symbol (its channels come from
    somewhere the trace could not follow, e.g. heads merged into the batch axis), the other is frozen: pruning
    a consumer's input columns without their producer would give a wrong model."""
    if left is None or right is None:
        p.freeze([left, right])
    else:
        p.atoms.unify_dims(left, right)


@register(aten.linear.default)
def _linear(p, node: Node) -> Syms | None:
    x, weight = p.of(node.args[0]), p.of(node.args[1])
    bias = p.of(node.args[2]) if len(node.args) > 2 else None
    x = x if x is not None else p.data_syms(node.args[0])
    if x is None or weight is None:
        p.freeze(weight)
        return p.data_syms(node)
    _contract(p, x[-1], weight[1])
    if bias is not None:
        p.atoms.unify_dims(bias[0], weight[0])
    return [*x[:-1], weight[0]]


@register(aten.addmm.default)
def _addmm(p, node: Node) -> Syms | None:
    bias, x, weight = (p.of(a) for a in node.args[:3])
    x = x if x is not None else p.data_syms(node.args[1])
    if x is None or weight is None:
        p.freeze(weight)
        return p.data_syms(node)
    _contract(p, x[-1], weight[0])
    if bias is not None:
        p.atoms.unify_dims(bias[-1], weight[1])
    return [x[0], weight[1]]


@register(aten.baddbmm.default)
def _baddbmm(p, node: Node) -> Syms | None:
    """input + batch1 @ batch2 (BLOOM adds its ALiBi bias this way)."""
    out = _matmul_syms(p, node, *node.args[1:3])
    added, shape = p.of(node.args[0]), tensor_shape(node.args[0])
    if out is not None and added is not None:
        offset = len(out) - len(shape)
        for i, (size, sym) in enumerate(zip(shape, added)):
            if size > 1 and sym is not None and out[offset + i] is not None:
                p.atoms.unify_dims(out[offset + i], sym)
    return out if out is not None else p.fallback(node)


@register(aten.matmul.default, aten.bmm.default, aten.mm.default)
def _matmul(p, node: Node) -> Syms | None:
    out = _matmul_syms(p, node, *node.args[:2])
    return out if out is not None else p.fallback(node)


def _matmul_syms(p, node: Node, a, b) -> Syms | None:
    sa, sb, shape_a, shape_b = p.of(a), p.of(b), tensor_shape(a), tensor_shape(b)
    if sa is None or sb is None or len(shape_a) < 2 or len(shape_b) < 2:
        return None
    _contract(p, sa[-1], sb[-2])
    batch = _broadcast_batch(p, shape_a[:-2], sa[:-2], shape_b[:-2], sb[:-2])
    return [*batch, sa[-2], sb[-1]]


def _broadcast_batch(p, shape_a, syms_a, shape_b, syms_b) -> Syms:
    n = max(len(shape_a), len(shape_b))
    pad_a = [1] * (n - len(shape_a)) + list(shape_a)
    pad_b = [1] * (n - len(shape_b)) + list(shape_b)
    sym_a = [None] * (n - len(syms_a)) + list(syms_a)
    sym_b = [None] * (n - len(syms_b)) + list(syms_b)
    out: Syms = []
    for size_a, size_b, x, y in zip(pad_a, pad_b, sym_a, sym_b):
        if size_a == size_b and x is not None and y is not None:
            p.atoms.unify_dims(x, y)
        out.append(x if size_a >= size_b and x is not None else (y if size_b > 1 else x))
    return out


@register(aten.scaled_dot_product_attention.default, aten._scaled_dot_product_flash_attention_for_cpu.default)
def _sdpa(p, node: Node) -> Syms | None:
    q, k, v = node.args[:3]
    sq, sk, sv = p.of(q), p.of(k), p.of(v)
    if sq is None or sk is None or sv is None:
        return p.data_syms(node)
    shape_q, shape_k = tensor_shape(q), tensor_shape(k)
    sk, sv = list(sk), list(sv)
    if len(shape_q) >= 3 and shape_q[-3] != shape_k[-3] and node.kwargs.get("enable_gqa"):
        repeat = p.atoms.new(shape_q[-3] // shape_k[-3], repeat=True)
        for syms in (sk, sv):
            syms[-3] = None if syms[-3] is None else (*syms[-3], repeat)
    for i in range(len(sq) - 2):
        p.atoms.unify_dims(sq[i], sk[i])
        p.atoms.unify_dims(sq[i], sv[i])
    p.atoms.unify_dims(sq[-1], sk[-1])
    out = [*sq[:-1], sv[-1]]
    return out if node.target == aten.scaled_dot_product_attention.default else [out]


@register(aten.embedding.default)
def _embedding(p, node: Node) -> Syms | None:
    weight = p.of(node.args[0])
    indices_shape = tensor_shape(node.args[1]) or ()
    if isinstance(node.args[0], Node):
        p.embedding_params.add(node.args[0].name)
    return [None] * len(indices_shape) + [None if weight is None else weight[1]]


@register(aten.view.default, aten.reshape.default, aten._unsafe_view.default)
def _reshape(p, node: Node) -> Syms | None:
    syms, in_shape, out_shape = p.of(node.args[0]), tensor_shape(node.args[0]), tensor_shape(node)
    if syms is None:
        return p.data_syms(node)
    return reshape_syms(p.atoms, in_shape, syms, out_shape)


def _size_one_dim(atoms: AtomTable, pieces: list[list]) -> DimSym:
    """A size-1 output dim: it carries a size-1 atom, or splits one head off the next atom (x.view(..., 1, head_dim))."""
    if not pieces or pieces[0][1] is None:
        return None
    piece_size, atom = pieces[0]
    if piece_size == 1:
        pieces.pop(0)
        return (atom,)
    if atoms.is_split(atom):
        return None
    outer, inner = atoms.refine(atom, 1)
    atoms.mark_atomic(inner)  # the constant inner size (head_dim) of a single-head reshape
    pieces[0:1] = [[piece_size, inner]]
    return (outer,)


def reshape_syms(atoms: AtomTable, in_shape, in_syms: Syms, out_shape) -> Syms:
    """Map dimension symbols through a reshape, refining atoms where a dimension is split."""
    pieces: list[list] = []  # [size, atom or None]
    for size, sym in zip(in_shape, in_syms):
        if sym is None:
            if size != 1:
                pieces.append([size, None])
        else:
            pieces.extend([atoms.size[leaf], leaf] for atom in sym for leaf in atoms.leaves(atom))
    out: Syms = []
    for size in out_shape:
        if size == 1:
            out.append(_size_one_dim(atoms, pieces))
            continue
        taken, need = [], size
        while need > 1 and pieces:
            piece_size, atom = pieces[0]
            if piece_size <= need and need % piece_size == 0:
                taken.append(atom)
                need //= piece_size
                pieces.pop(0)
            elif piece_size % need == 0:
                if atom is None:
                    pieces[0:1] = [[need, None], [piece_size // need, None]]
                elif atoms.find(atom) in atoms.refinement:  # refined meanwhile: use its factors
                    pieces[0:1] = [[atoms.size[leaf], leaf] for leaf in atoms.leaves(atom)]
                elif atoms.find(atom) in atoms.segments:  # a concatenation has no row-major factors
                    break
                else:
                    outer, inner = atoms.refine(atom, need)
                    atoms.mark_atomic(inner)  # modeling code reshapes with a constant inner size (head_dim)
                    pieces[0:1] = [[need, outer], [piece_size // need, inner]]
            else:
                break
        if need != 1:  # sizes do not factor cleanly: freeze what we touched
            for _, atom in pieces:
                if atom is not None:
                    atoms.mark_atomic(atom)
            for atom in taken:
                if atom is not None:
                    atoms.mark_atomic(atom)
            return [None] * len(out_shape)
        if all(a is None for a in taken):
            out.append(None)
        elif any(a is None for a in taken):
            for atom in taken:
                if atom is not None:
                    atoms.mark_atomic(atom)
            out.append(None)
        else:
            out.append(tuple(taken))
    return out


@register(aten.flatten.using_ints, aten.unflatten.int)
def _flatten(p, node: Node) -> Syms | None:
    syms, in_shape, out_shape = p.of(node.args[0]), tensor_shape(node.args[0]), tensor_shape(node)
    if syms is None:
        return p.data_syms(node)
    return reshape_syms(p.atoms, in_shape, syms, out_shape)


@register(aten.stack.default)
def _stack(p, node: Node) -> Syms | None:
    """Stacking equal-shape tensors: their dims are indexed alike; the new axis is not a channel axis."""
    tensors = list(node.args[0])
    out_shape = tensor_shape(node)
    dim = _dim(node.args[1] if len(node.args) > 1 else 0, len(out_shape))
    merged: Syms = [None] * (len(out_shape) - 1)
    for t in tensors:
        for i, sym in enumerate(p.of(t) or []):
            if sym is None:
                continue
            if merged[i] is None:
                merged[i] = sym
            else:
                p.atoms.unify_dims(merged[i], sym)
    merged.insert(dim, None)
    return merged


@register(aten.select.int)
def _select(p, node: Node) -> Syms | None:
    """One index of a dimension (BLOOM picks q, k, v out of a (heads, 3, head_dim) view): that dimension's
    channels are used partly, so they are frozen; the other dimensions pass through."""
    syms, shape = p.of(node.args[0]), tensor_shape(node.args[0])
    if syms is None:
        return p.data_syms(node)
    dim = _dim(node.args[1], len(shape))
    p.freeze([syms[dim]])
    return [sym for i, sym in enumerate(syms) if i != dim]


@register(aten.index.Tensor)
def _index(p, node: Node) -> Syms | None:
    """x[..., idx] with one 1-D index tensor (Falcon picks k and v out of a (groups, q_per_kv + 2) view): the
    indexed dimension is frozen and gets a fresh atomic symbol; the other dimensions pass through."""
    syms, shape, out_shape = p.of(node.args[0]), tensor_shape(node.args[0]), tensor_shape(node)
    indices = list(node.args[1])
    used = [i for i, index in enumerate(indices) if index is not None]
    if syms is None or len(used) != 1 or len(tensor_shape(indices[used[0]]) or ()) != 1 or len(out_shape) != len(shape):
        return p.fallback(node)
    dim = used[0]
    out = list(syms)
    if syms[dim] is not None:
        out[dim] = _frozen_dim(p, syms[dim], out_shape[dim])
    return out


@register(aten.unsqueeze.default)
def _unsqueeze(p, node: Node) -> Syms | None:
    syms = list(p.of(node.args[0]) or p.data_syms(node.args[0]) or [])
    syms.insert(_dim(node.args[1], len(syms) + 1), None)
    return syms


@register(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(p, node: Node) -> Syms | None:
    syms, shape = p.of(node.args[0]), tensor_shape(node.args[0])
    if syms is None:
        return p.data_syms(node)
    if len(node.args) < 2:
        dims = {i for i, s in enumerate(shape) if s == 1}
    else:
        raw = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        dims = {_dim(d, len(shape)) for d in raw if shape[_dim(d, len(shape))] == 1}
    return [s for i, s in enumerate(syms) if i not in dims]


@register(aten.transpose.int)
def _transpose(p, node: Node) -> Syms | None:
    syms = list(p.of(node.args[0]) or p.data_syms(node.args[0]))
    a, b = (_dim(d, len(syms)) for d in node.args[1:3])
    syms[a], syms[b] = syms[b], syms[a]
    return syms


@register(aten.t.default, aten.numpy_T.default)
def _t(p, node: Node) -> Syms | None:
    return list(reversed(p.of(node.args[0]) or p.data_syms(node.args[0])))


@register(aten.permute.default)
def _permute(p, node: Node) -> Syms | None:
    syms = p.of(node.args[0]) or p.data_syms(node.args[0])
    return [syms[_dim(d, len(syms))] for d in node.args[1]]


@register(aten.expand.default, aten.broadcast_to.default)
def _expand(p, node: Node) -> Syms | None:
    syms, in_shape, out_shape = p.of(node.args[0]), tensor_shape(node.args[0]), tensor_shape(node)
    if syms is None or all(s is None for s in syms):
        return p.data_syms(node)
    offset = len(out_shape) - len(in_shape)
    out: Syms = [None] * offset + list(syms)
    for i, size in enumerate(in_shape):
        if size == 1 and out_shape[offset + i] > 1:
            out[offset + i] = (p.atoms.new(out_shape[offset + i], repeat=True),)
    return out


@register(aten.slice.Tensor)
def _slice(p, node: Node) -> Syms | None:
    syms, in_shape, out_shape = p.of(node.args[0]), tensor_shape(node.args[0]), tensor_shape(node)
    if syms is None:
        return p.data_syms(node)
    dim = _dim(node.args[1] if len(node.args) > 1 else 0, len(in_shape))
    out = list(syms)
    if in_shape[dim] == out_shape[dim] or syms[dim] is None:
        return out
    start, stop, step = list(node.args[2:5]) + [None, None, 1][len(node.args[2:5]):]
    size = in_shape[dim]
    start = 0 if start is None else min(max(start + size if start < 0 else start, 0), size)
    stop = size if stop is None else min(max(stop + size if stop < 0 else stop, 0), size)
    sizes = [n for n in (start, stop - start, size - stop) if n > 0]
    pieces = _segments(p, syms[dim], sizes) if step == 1 and stop - start == out_shape[dim] else None
    piece = pieces[1 if start > 0 else 0] if pieces else None
    out[dim] = (piece,) if piece is not None else _frozen_dim(p, syms[dim], out_shape[dim])
    return out


@register(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)
def _split(p, node: Node) -> list[Syms | None]:
    """A fused projection's output split into q/k/v or gate/up: one segment of the producer's axis per piece."""
    syms, in_shape = p.of(node.args[0]), tensor_shape(node.args[0])
    values = [v for v in node.meta.get("val", ())]
    out_shapes = [tuple(v.shape) for v in values]
    if syms is None:
        return [[None] * len(shape) for shape in out_shapes]
    dim = _dim(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), len(in_shape))
    sizes = [shape[dim] for shape in out_shapes]
    pieces = _segments(p, syms[dim], sizes) if syms[dim] is not None and len(sizes) > 1 else None
    if pieces is not None and None in pieces:
        pieces = None
    outputs = []
    for index, shape in enumerate(out_shapes):
        out = list(syms)
        if syms[dim] is not None:
            out[dim] = (pieces[index],) if pieces else _frozen_dim(p, syms[dim], shape[dim])
        outputs.append(out)
    return outputs


def _segments(p, sym: tuple[int, ...], sizes: list[int]) -> list[int] | None:
    """Cut a one-atom dimension into consecutive segments of `sizes` (None if it is a product of atoms)."""
    return p.atoms.split_segments(sym[0], sizes) if len(sym) == 1 else None


def _frozen_dim(p, sym: tuple[int, ...], size: int) -> tuple[int]:
    """A piece the symbols cannot express: freeze its source and give it a fresh atomic atom."""
    for atom in sym:
        p.atoms.mark_atomic(atom)
    fresh = p.atoms.new(size)
    p.atoms.mark_atomic(fresh)
    return (fresh,)


@register(aten.cat.default)
def _cat(p, node: Node) -> Syms | None:
    tensors = [t for t in node.args[0] if tensor_shape(t) is not None and tensor_shape(t) != (0,)]
    out_shape = tensor_shape(node)
    dim = _dim(node.args[1] if len(node.args) > 1 else 0, len(out_shape))
    out: Syms = [None] * len(out_shape)
    touched = False
    for t in tensors:
        syms = p.of(t)
        if syms is None:
            continue
        for i, sym in enumerate(syms):
            if i == dim:
                touched |= sym is not None
                if sym is not None:
                    for atom in sym:
                        p.atoms.mark_atomic(atom)
            elif out[i] is None:
                out[i] = sym
            else:
                p.atoms.unify_dims(out[i], sym)
    if touched:
        out[dim] = (p.atoms.new(out_shape[dim]),)
        p.atoms.mark_atomic(out[dim][0])
    return out


def _reduce(p, node: Node) -> Syms | None:
    syms, in_shape = p.of(node.args[0]), tensor_shape(node.args[0])
    if syms is None:
        return p.data_syms(node)
    raw = node.args[1] if len(node.args) > 1 else None
    keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
    dims = set(range(len(in_shape))) if raw is None else {
        _dim(d, len(in_shape)) for d in (raw if isinstance(raw, (list, tuple)) else [raw])}
    if keepdim:
        return [None if i in dims else s for i, s in enumerate(syms)]
    return [s for i, s in enumerate(syms) if i not in dims]


for _op in (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.var.correction, aten.amin.default):
    register(_op)(_reduce)


@register(aten.layer_norm.default, aten.rms_norm.default)
def _norm(p, node: Node) -> Syms | None:
    syms = p.of(node.args[0])
    if syms is None:
        return p.data_syms(node)
    for arg in node.args[2:4]:
        weight = p.of(arg)
        if weight is not None:
            p.atoms.unify_dims(syms[-1], weight[0])
    return list(syms)


@register(operator.getitem)
def _getitem(p, node: Node) -> Syms | None:
    parent = p.of(node.args[0])
    if isinstance(parent, list) and parent and isinstance(parent[0], list):
        return parent[node.args[1]]
    return p.data_syms(node)


from depgraph_llm.graph import routing_rules  # noqa: E402,F401  (registers the routed-expert rules)
