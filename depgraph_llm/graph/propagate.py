"""Propagate dimension symbols through an exported ATen graph, one registered handler per op family.

Each tensor value gets one `DimSym` per dimension. Handlers unify the symbols of dimensions that must share
indices (elementwise ops, contractions) and build the symbols of their outputs. Ops without a handler are
handled conservatively: shape-preserving ops pass symbols through, anything else freezes the channels it
touches (marks them atomic) so the pruner never cuts through an op it does not understand.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch.fx import Node

from depgraph_llm.graph.op_rules import (FREEZING_OPS, NO_TENSOR_OPS, OP_HANDLERS, PASS_THROUGH_OPS, Syms, broadcastable,
                       flat_args, is_elementwise, tensor_shape)
from depgraph_llm.graph.routing_rules import carry_value_atom
from depgraph_llm.graph.symbols import AtomTable

log = logging.getLogger(__name__)

@dataclass
class Propagation:
    """Running state: the atom table and the symbols of every tensor node seen so far."""

    atoms: AtomTable = field(default_factory=AtomTable)
    syms: dict[str, object] = field(default_factory=dict)
    param_axes: dict[tuple[str, int], int] = field(default_factory=dict)
    embedding_params: set[str] = field(default_factory=set)
    unknown_ops: set[str] = field(default_factory=set)
    output_atoms: set[int] = field(default_factory=set)
    value_atoms: dict[str, object] = field(default_factory=dict)  # index tensors -> the axis their values index
    routed_atoms: set[int] = field(default_factory=set)  # expert axes reached through routing indices

    def of(self, arg: object) -> Syms | None:
        """Symbols of a graph argument (None for constants and non-tensors)."""
        return self.syms.get(arg.name) if isinstance(arg, Node) else None

    def data_syms(self, node: Node) -> Syms | None:
        shape = tensor_shape(node)
        return None if shape is None else [None] * len(shape)

    def freeze(self, syms: Syms | None) -> None:
        for sym in syms or []:
            for atom in sym or ():
                self.atoms.mark_atomic(atom)

    def broadcast(self, node: Node, tensor_args: list[Node]) -> Syms | None:
        """Elementwise op: unify aligned non-broadcast dims, output takes the known symbol."""
        out_shape = tensor_shape(node)
        if out_shape is None:
            return None
        out: Syms = [None] * len(out_shape)
        for arg in tensor_args:
            shape, syms = tensor_shape(arg), self.of(arg)
            if shape is None or syms is None or len(shape) > len(out_shape):
                continue
            offset = len(out_shape) - len(shape)
            for i, (size, sym) in enumerate(zip(shape, syms)):
                if sym is None or size != out_shape[offset + i]:
                    continue
                if out[offset + i] is None:
                    out[offset + i] = sym
                else:
                    self.atoms.unify_dims(out[offset + i], sym)
        return out

    def run_node(self, node: Node) -> None:
        if node.op != "call_function":
            if node.op == "output":
                for arg in flat_args(node):
                    for sym in (self.of(arg) or []) if isinstance(arg, Node) else []:
                        self.output_atoms.update(sym if isinstance(sym, tuple) else ())
                return
            self.syms[node.name] = self.data_syms(node)
            return
        handler = OP_HANDLERS.get(node.target)
        if handler is not None:
            self.syms[node.name] = handler(self, node)
        elif node.target in NO_TENSOR_OPS:
            return
        else:
            self.syms[node.name] = self.fallback(node)
        carry_value_atom(self, node)

    def fallback(self, node: Node) -> Syms | None:
        tensor_args = [a for a in flat_args(node) if isinstance(a, Node) and tensor_shape(a) is not None]
        out_shape = tensor_shape(node)
        if node.target in PASS_THROUGH_OPS and tensor_args and tensor_shape(tensor_args[0]) == out_shape:
            return list(self.of(tensor_args[0]) or self.data_syms(node))
        if node.target not in FREEZING_OPS and out_shape is not None and tensor_args and all(
                broadcastable(tensor_shape(a), out_shape) for a in tensor_args) and is_elementwise(node):
            return self.broadcast(node, tensor_args)
        touched = [self.of(a) for a in tensor_args]
        if any(sym is not None for syms in touched for sym in (syms or [])):
            self.unknown_ops.add(str(node.target))
            for syms in touched:
                self.freeze(syms)
            return self.frozen_syms(node)
        return self.data_syms(node)

    def frozen_syms(self, node: Node) -> Syms | None:
        """Outputs of an op without a rule: fresh atomic atoms, so whatever consumes these channels downstream
        (e.g. the projection after a fused-qkv split) is kept whole too instead of looking unconstrained."""
        value = node.meta.get("val")
        if isinstance(value, (list, tuple)):  # e.g. split: one list of symbols per output tensor
            return [self._atomic_dims(tuple(v.shape)) if isinstance(v, torch.Tensor) else None for v in value]
        shape = tensor_shape(node)
        return None if shape is None else self._atomic_dims(shape)

    def _atomic_dims(self, shape: tuple[int, ...]) -> Syms:
        syms: Syms = []
        for size in shape:
            atom = self.atoms.new(int(size))
            self.atoms.mark_atomic(atom)
            syms.append((atom,))
        return syms


def propagate(graph: torch.fx.Graph, param_names: dict[str, str]) -> Propagation:
    """Run symbol propagation over `graph`; `param_names` maps placeholder names to parameter names."""
    prop = Propagation()
    for node in graph.nodes:
        if node.op == "placeholder" and node.name in param_names:
            shape = tensor_shape(node)
            syms: Syms = []
            for axis, size in enumerate(shape):
                atom = prop.atoms.new(size)
                key = (param_names[node.name], axis)
                if key in prop.param_axes:  # a tied parameter lifted twice: both are one tensor
                    prop.atoms.unify(prop.param_axes[key], atom)
                else:
                    prop.param_axes[key] = atom
                syms.append((atom,))
            prop.syms[node.name] = syms
        else:
            prop.run_node(node)
    if prop.unknown_ops:
        log.info("ops without a coupling rule (their channels are kept whole): %s", sorted(prop.unknown_ops))
    return prop
