"""OBS for query heads nested in KV groups (grouped-query attention): which query heads each KV group loses.

Every KV group keeps the same number of query heads (the config states one count), so the choice has a quota
per group. Structured OBS on o_proj's inputs (SlimGPT's head pruning): greedily, the alive head with the least
saliency tr(W_u (H^-1_uu)^-1 W_u^T) among groups that still owe a removal goes, and W and H^-1 are updated
exactly for it. Heads are few (tens per layer), so one head goes per round.
"""
from __future__ import annotations

import torch

from depgraph_llm.graph.groups import Slice

from .solvers import block_saliency, damped_inverse, remove_columns


def nested_head_columns(nested: Slice, kv_groups: int, per_group: int) -> tuple[list[torch.Tensor], list[int]]:
    """The input columns of every query head (KV group g, head j), g-major, and the KV group of each."""
    empty = torch.zeros(kv_groups, per_group, dtype=torch.bool)
    inside = ~nested.axis_mask(empty)  # the slice's own positions (the mask keeps everything outside it)
    units, blocks = [], []
    for g in range(kv_groups):
        for j in range(per_group):
            one = empty.clone()
            one[g, j] = True
            units.append((nested.axis_mask(one) & inside).nonzero().flatten())
            blocks.append(g)
    return units, blocks


def obs_select_per_block(weight: torch.Tensor, gram: torch.Tensor, units: list[torch.Tensor], blocks: list[int],
                         quota: dict[int, int], damp: float = 0.01) -> list[int]:
    """Indices of the units structured OBS removes when block b must lose exactly quota[b] of its units."""
    w = weight.double().clone()
    h_inv = damped_inverse(gram, damp)
    owed = {b: n for b, n in quota.items() if n > 0}
    alive = list(range(len(units)))
    removed: list[int] = []
    while owed:
        candidates = [u for u in alive if blocks[u] in owed]
        saliency = torch.stack([block_saliency(w, h_inv, units[u]) for u in candidates])
        unit = candidates[int(torch.argmin(saliency))]
        remove_columns(w, h_inv, units[unit])
        removed.append(unit)
        alive.remove(unit)
        owed[blocks[unit]] -= 1
        if not owed[blocks[unit]]:
            del owed[blocks[unit]]
    return removed

