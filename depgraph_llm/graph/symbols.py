"""Dimension symbols: a union-find over "atoms" (channel spaces) that can be refined into row-major factors.

An atom stands for one axis of channels, e.g. the 576 output rows of a q_proj weight. Tracing unifies atoms that
must be indexed identically (an elementwise add, a linear's contraction) and refines an atom into factors when
a reshape splits it, e.g. 576 -> (9 heads, 64 head_dim). Broadcasting a size-1 axis creates a *repeat* atom:
that is how a GQA key head shows up as shared by several query heads. Slicing a fused projection's output
(Phi-3's qkv_proj, GPT-2's c_attn) splits an atom into consecutive *segments* instead, one per piece.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

DimSym = tuple[int, ...] | None
"""A tensor dimension: None for data axes (batch, sequence, constants), else a row-major product of atoms."""


@dataclass
class AtomTable:
    """Union-find over atoms with per-root refinement into row-major factors."""

    parent: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    is_repeat: list[bool] = field(default_factory=list)
    atomic: list[bool] = field(default_factory=list)
    refinement: dict[int, list[int]] = field(default_factory=dict)
    segments: dict[int, list[int]] = field(default_factory=dict)

    def new(self, size: int, repeat: bool = False) -> int:
        """Create a fresh atom of `size` channels."""
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.is_repeat.append(repeat)
        self.atomic.append(False)
        return len(self.parent) - 1

    def find(self, atom: int) -> int:
        root = atom
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[atom] != root:  # path compression
            self.parent[atom], atom = root, self.parent[atom]
        return root

    def leaves(self, atom: int) -> list[int]:
        """The unrefined root atoms that `atom` is the row-major product of."""
        root = self.find(atom)
        children = self.refinement.get(root)
        if children is None:
            return [root]
        return [leaf for child in children for leaf in self.leaves(child)]

    def is_split(self, atom: int) -> bool:
        """Already refined into factors or cut into segments."""
        root = self.find(atom)
        return root in self.refinement or root in self.segments

    def refine(self, atom: int, outer: int) -> list[int]:
        """Split an unrefined atom of size n into factors (outer, n // outer); returns the two new atoms."""
        root = self.find(atom)
        assert not self.is_split(root) and self.size[root] % outer == 0
        children = [self.new(outer, self.is_repeat[root]), self.new(self.size[root] // outer, self.is_repeat[root])]
        for child in children:
            self.atomic[child] = self.atomic[root]
        self.refinement[root] = children
        return children

    def mark_atomic(self, atom: int) -> None:
        """Forbid pruning inside `atom` (and every factor or segment of it)."""
        for leaf in self.leaves(atom):
            for child in self.segments.get(leaf, ()):
                self.mark_atomic(child)
            self.atomic[leaf] = True
        self.atomic[self.find(atom)] = True

    def segment_leaves(self, atom: int) -> list[tuple[int, int]]:
        """(offset, atom) of every innermost segment of `atom`, in order; [(0, root)] when it is not cut."""
        root = self.find(atom)
        children = self.segments.get(root)
        if children is None:
            return [(0, root)]
        out, offset = [], 0
        for child in children:
            out.extend((offset + inner, leaf) for inner, leaf in self.segment_leaves(child))
            offset += self.size[self.find(child)]
        return out

    def split_segments(self, atom: int, sizes: list[int]) -> list[int] | None:
        """Cut `atom` into consecutive segments of `sizes` (a slice or split of a fused projection's output).

        Returns one atom per piece (None for a piece that spans several earlier segments), or None when the cut
        cannot be made (the atom is atomic or already refined into factors); the caller then freezes."""
        root = self.find(atom)
        if self.atomic[root] or root in self.refinement or sum(sizes) != self.size[root]:
            return None
        position = 0
        for size in sizes[:-1]:
            position += size
            if not self._cut(root, position):
                return None
        starts = dict(self.segment_leaves(root))
        pieces, offset = [], 0
        for size in sizes:
            leaf = starts.get(offset)
            pieces.append(leaf if leaf is not None and self.size[self.find(leaf)] == size else None)
            offset += size
        return pieces

    def _cut(self, root: int, position: int) -> bool:
        """Make `position` a segment boundary inside `root`; False if that needs cutting a refined atom."""
        root = self.find(root)
        if position <= 0 or position >= self.size[root]:
            return True
        children = self.segments.get(root)
        if children is None:
            if root in self.refinement or self.atomic[root]:
                return False
            self.segments[root] = [self.new(position, self.is_repeat[root]),
                                   self.new(self.size[root] - position, self.is_repeat[root])]
            return True
        offset = 0
        for child in children:
            size = self.size[self.find(child)]
            if offset < position < offset + size:
                return self._cut(child, position - offset)
            offset += size
        return True

    def align(self, left: list[int], right: list[int]) -> list[tuple[int, int]] | None:
        """Pair up two leaf sequences of equal total size, refining leaves where one factor divides the other."""
        left, right, pairs = list(left), list(right), []
        while left and right:
            a, b = self.find(left[0]), self.find(right[0])
            size_a, size_b = self.size[a], self.size[b]
            if size_a == size_b:
                pairs.append((a, b))
                left.pop(0)
                right.pop(0)
            elif size_b % size_a == 0 and not self.is_split(b):
                right[0:1] = self.refine(b, size_a)
            elif size_a % size_b == 0 and not self.is_split(a):
                left[0:1] = self.refine(a, size_b)
            else:
                return None
        return pairs if not left and not right else None

    def unify(self, a: int, b: int) -> None:
        """Declare that atoms a and b index the same channels in the same order."""
        root_a, root_b = self.find(a), self.find(b)
        if root_a == root_b:
            return
        if self.size[root_a] != self.size[root_b]:
            self.mark_atomic(root_a)
            self.mark_atomic(root_b)
            return
        if root_a in self.segments or root_b in self.segments:
            self._unify_segmented(root_a, root_b)
            return
        leaves_a, leaves_b = self.leaves(root_a), self.leaves(root_b)
        if len(leaves_a) > 1 or len(leaves_b) > 1:
            pairs = self.align(leaves_a, leaves_b)
            if pairs is None:
                log.debug("incompatible factorisations %s / %s: marking atomic", leaves_a, leaves_b)
                self.mark_atomic(root_a)
                self.mark_atomic(root_b)
                return
            for x, y in pairs:
                self._union_leaves(x, y)
            root_a, root_b = self.find(root_a), self.find(root_b)
            if root_a == root_b:
                return
            keep = root_a if root_a in self.refinement else root_b
            other = root_b if keep == root_a else root_a
            self.refinement.pop(other, None)
            self._link(keep, other)
            return
        self._union_leaves(root_a, root_b)

    def unify_dims(self, left: DimSym, right: DimSym) -> None:
        """Unify two tensor dimensions (each a product of atoms)."""
        if left is None or right is None or left == right:
            return
        leaves_left = [leaf for atom in left for leaf in self.leaves(atom)]
        leaves_right = [leaf for atom in right for leaf in self.leaves(atom)]
        pairs = self.align(leaves_left, leaves_right)
        if pairs is None:
            for atom in (*left, *right):
                self.mark_atomic(atom)
            return
        for x, y in pairs:
            self.unify(x, y)

    def _unify_segmented(self, root_a: int, root_b: int) -> None:
        """Unify two equal-size roots of which at least one is cut into segments: segment by segment when both
        are cut alike, by adopting the cut when the other is whole; otherwise the channels are frozen."""
        if root_a not in self.segments:
            root_a, root_b = root_b, root_a
        if root_b in self.refinement:
            self.mark_atomic(root_a)
            self.mark_atomic(root_b)
            return
        if root_b in self.segments:
            left, right = self.segment_leaves(root_a), self.segment_leaves(root_b)
            if [(o, self.size[self.find(x)]) for o, x in left] != [(o, self.size[self.find(y)]) for o, y in right]:
                self.mark_atomic(root_a)
                self.mark_atomic(root_b)
                return
            for (_, x), (_, y) in zip(left, right):
                self.unify(x, y)
            self.segments.pop(root_b)
        self._link(root_a, root_b)
        if self.atomic[root_a]:
            self.mark_atomic(root_a)

    def _union_leaves(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a == root_b:
            return
        if self.is_split(root_a) or self.is_split(root_b):
            self.unify(root_a, root_b)
            return
        self._link(root_a, root_b)

    def _link(self, keep: int, other: int) -> None:
        self.parent[other] = keep
        self.is_repeat[keep] = self.is_repeat[keep] or self.is_repeat[other]
        self.atomic[keep] = self.atomic[keep] or self.atomic[other]
