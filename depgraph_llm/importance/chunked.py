"""Unit scores of one parameter with its element scores computed a block of rows at a time, bit-identical to
scoring the whole tensor at once.

Scoring a 128256 x 4096 embedding or LM head in one piece holds its float32 copy, a temporary and the element
scores (three float32 copies, 6.3 GB at Llama-3.1-8B widths). Here only the float32 element scores are whole: each
block of rows is converted, scored and written into them, then `Slice.unit_scores` sums them exactly as before
(the same values in the same layout, so the same reduction order and the same bits).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from depgraph_llm.graph.groups import Slice

CHUNK_ELEMENTS = 1 << 24  # elements scored per block (64 MB in float32); smaller tensors are scored whole

ElementScoreFn = Callable[[torch.Tensor, torch.Tensor | None, object], torch.Tensor]


def element_scores_in_blocks(score: ElementScoreFn, param: torch.Tensor, grad: torch.Tensor | None, extra,
                             chunk_elements: int) -> torch.Tensor:
    """`score(param.float(), grad.float(), extra)` filled a block of rows at a time (float32, on the CPU)."""
    rows = param.shape[0]
    per_block = max(1, chunk_elements // max(1, param[0].numel()))
    element = torch.empty(param.shape, dtype=torch.float32)
    for start in range(0, rows, per_block):
        count = min(per_block, rows - start)
        block_grad = None if grad is None else grad.detach().narrow(0, start, count).float()
        element.narrow(0, start, count).copy_(score(param.detach().narrow(0, start, count).float(), block_grad,
                                                    extra))
        del block_grad
    return element


def param_unit_scores(score: ElementScoreFn, param: torch.Tensor, grad: torch.Tensor | None, extra,
                      uses: list[tuple[str, Slice]], row_wise: bool = True,
                      chunk_elements: int | None = None) -> list[tuple[str, torch.Tensor]]:
    """[(group name, float64 unit scores on the CPU)] of `param` for each of its slices, equal bit for bit to
    `s.unit_scores(score(param.float(), grad, extra)).double()`; `row_wise` says that the element scores of a block
    of rows are those rows of the whole tensor's (false for random scores, which are then computed whole)."""
    chunk_elements = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    with torch.no_grad():
        if row_wise and param.dim() >= 2 and param.numel() > chunk_elements:
            element = element_scores_in_blocks(score, param, grad, extra, chunk_elements)
        else:
            element = score(param.detach().float(), None if grad is None else grad.detach().float(), extra)
        return [(group_name, s.unit_scores(element).double().cpu()) for group_name, s in uses]
