"""Structured OBS saliency (SlimGPT): the output error of removing an input column j of a linear layer and
optimally updating the others is ||W_:,j||^2 / [H^-1]_jj, with H = X^T X (+ ridge) the layer Hessian.

Computed layer by layer through the sequential pipeline: only the current decoder layer's Hessians (one per
linear layer, in x in float64) are in memory at a time. Units sum the saliencies of their columns (the
diagonal approximation of the block saliency for multi-column units such as heads).
Cost: one forward pass through every layer, one in x in matrix inverse per linear layer."""
from __future__ import annotations

import torch
from torch import nn

from depgraph_llm.graph.coupling import find_layers_path
from depgraph_llm.layers import InMemorySource, LayerPipeline
from depgraph_llm.layers.callbacks import HessianDiagonals
from .base import Estimator, progress_bar, register_estimator


@torch.no_grad()
def inverse_hessian_diagonals(model: nn.Module, batches: list[torch.Tensor], damp: float = 0.01,
                              show_progress: bool = False) -> dict[str, torch.Tensor]:
    """{weight name: diag((X^T X + ridge)^-1)} for every linear layer inside the decoder layers."""
    hessians = HessianDiagonals(damp)
    LayerPipeline(InMemorySource(model, find_layers_path(model)), [hessians],
                  progress=progress_bar("OBS Hessians", show_progress)).run(batches)
    return hessians.result


@register_estimator
class OBS(Estimator):
    name = "obs"
    needs_calibration = True
    consumer_only = True
    summary = "SlimGPT structured OBS saliency ||W_:,j||^2 / [H^-1]_jj from the layer Hessian X^T X"
    cost = "one layer-by-layer forward pass; one Hessian inverse per linear layer, one layer at a time"

    def prepare(self, model, batches, show_progress):
        return inverse_hessian_diagonals(model, batches, show_progress=show_progress)

    def statistics(self):
        return HessianDiagonals()

    def extra_from(self, statistics):
        return statistics.result

    def element_scores(self, weight, grad, extra=None):
        if extra is None or weight.dim() != 2:
            return torch.zeros_like(weight)
        return weight.pow(2) / extra.to(weight.dtype)[None, :]
