"""Where finished layers go: sliced in place (the in-memory path) or, in the streaming path, sliced, written to
the output shards and freed (`checkpoint/shards.py`)."""
from __future__ import annotations

from torch import nn

from depgraph_llm.graph.coupling import CouplingGraph
from depgraph_llm.models import ArchSpec
from depgraph_llm.planning.plan import PrunePlan
from depgraph_llm.removal.apply import slice_layer

from .pipeline import LayerSink


class SliceSink(LayerSink):
    """The per-layer step of `apply_plan`: each layer is sliced as soon as every callback is done with it
    (reconstruction may still change the plan's choice for this layer, so the masks are read then)."""

    def __init__(self, coupling: CouplingGraph, plan: PrunePlan, spec: ArchSpec) -> None:
        self.coupling, self.plan, self.spec = coupling, plan, spec

    def write(self, index: int, name: str, layer: nn.Module) -> None:
        slice_layer(layer, index, self.coupling, self.plan, self.spec)
