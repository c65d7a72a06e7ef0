"""Plain data types shared by every stage: slices of parameters and the groups of units they form."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import torch


class GroupKind(str, Enum):
    """What a group's units are."""

    CHANNELS = "channels"  # one unit = one channel of an inner width (e.g. MLP intermediate)
    HEADS = "heads"        # one unit = one attention head or KV group (a block of head_dim channels)
    HIDDEN = "hidden"      # one unit = one channel of the residual stream, across every layer
    VOCAB = "vocab"        # one unit = one token row of the embedding / LM head
    LAYER = "layer"        # the single unit is a whole decoder layer
    EXPERTS = "experts"    # one unit = one routed expert (router row + slice e of every fused expert tensor)
    EXPERT_CHANNELS = "expert_channels"  # one unit = one intermediate channel shared by all experts of a layer


# a group's name ends in ".<suffix>" (graph/coupling.py names them); kinds not listed end in ".channels"
NAME_SUFFIX = {GroupKind.HEADS: "heads", GroupKind.VOCAB: "vocab", GroupKind.EXPERTS: "experts"}


@dataclass(frozen=True, order=True)
class Slice:
    """One parameter axis that a group's units run along.

    The axis positions [offset, offset + prod(factors)) are viewed as a row-major grid `factors`; the group's unit
    index runs along `factor`. For a nested group (query heads inside KV groups) `outer` is the factor of the
    enclosing group. A fused axis (Phi-3's qkv_proj rows) has one slice per segment; `extent` is the whole axis.
    """

    param: str
    axis: int
    factors: tuple[int, ...]
    factor: int
    outer: int | None = None
    offset: int = 0
    extent: int | None = None

    @property
    def length(self) -> int:
        """Number of axis positions this slice covers."""
        return math.prod(self.factors)

    @property
    def axis_size(self) -> int:
        return self.length if self.extent is None else self.extent

    def unit_scores(self, element_scores: torch.Tensor) -> torch.Tensor:
        """Sum per-element scores of this parameter into per-unit scores ((size,) or (outer, size))."""
        segment = element_scores.narrow(self.axis, self.offset, self.length)
        return self.units_from_axis_sums(segment.movedim(self.axis, 0).reshape(self.length, -1).sum(1))

    def units_from_axis_sums(self, per_axis: torch.Tensor) -> torch.Tensor:
        """Per-unit scores from the scores summed per position of this slice's segment ((length,))."""
        grid = per_axis.reshape(self.factors)
        keep = [self.factor] if self.outer is None else [self.outer, self.factor]
        reduce = [d for d in range(len(self.factors)) if d not in keep]
        return grid.sum(dim=reduce) if reduce else grid

    def axis_mask(self, keep: torch.Tensor) -> torch.Tensor:
        """Boolean mask over the whole axis from a keep mask over units ((size,) or (outer, size)); positions outside
        this slice's segment are kept (other groups decide them)."""
        grid = self._segment_mask(keep)
        if self.axis_size == self.length:
            return grid
        full = torch.ones(self.axis_size, dtype=torch.bool)
        full[self.offset:self.offset + self.length] = grid
        return full

    def unit_indices(self, unit: int) -> torch.Tensor:
        """Axis positions that belong to one unit of a (non-nested) group."""
        one_hot = torch.zeros(self.factors[self.factor], dtype=torch.bool)
        one_hot[unit] = True
        return self._segment_mask(one_hot).nonzero().flatten() + self.offset

    def _segment_mask(self, keep: torch.Tensor) -> torch.Tensor:
        """Mask over this slice's own positions from a mask over units ((size,) or (outer, size))."""
        shape = [1] * len(self.factors)
        shape[self.factor] = self.factors[self.factor]
        if self.outer is not None:
            shape[self.outer] = self.factors[self.outer]
        return keep.reshape(shape).expand(self.factors).reshape(-1)


@dataclass
class Group:
    """A set of coupled units that are removed together, one unit at a time."""

    name: str
    kind: GroupKind
    size: int
    slices: tuple[Slice, ...] = ()
    layer: int | None = None
    unit_width: int = 1
    nested: Group | None = None
    queries_per_unit: int = 1  # query heads inside one unit of a heads group that cannot split them (Falcon)
    module: str | None = None
    params: tuple[str, ...] = field(default=())
