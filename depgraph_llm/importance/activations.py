"""Estimators from input-activation statistics of each linear layer (one no-grad pass over calibration data).

Cost: one forward pass, layer by layer; memory: two float64 vectors per linear layer (sum and sum of squares of its inputs)."""
from __future__ import annotations

import torch
from torch import nn
from depgraph_llm.graph.coupling import find_layers_path
from depgraph_llm.layers import InMemorySource, LayerPipeline
from depgraph_llm.layers.callbacks import InputStatistics
from .base import Estimator, progress_bar, register_estimator


@torch.no_grad()
def input_statistics(model: nn.Module, batches: list[torch.Tensor],
                     show_progress: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """{weight name: {"sum", "sumsq" (in_features,), "tokens"}} of every linear layer's input (one layer-pipeline
    pass: inside the decoder layers one layer at a time, then the modules around them)."""
    statistics = InputStatistics()
    LayerPipeline(InMemorySource(model, find_layers_path(model)), [statistics],
                  progress=progress_bar("activation statistics", show_progress)).run(batches)
    return statistics.stats


class _ActivationEstimator(Estimator):
    needs_calibration = True
    consumer_only = True
    cost = "one forward pass; two vectors per linear layer"

    def prepare(self, model, batches, show_progress):
        return input_statistics(model, batches, show_progress)

    def statistics(self):
        return InputStatistics()

    def extra_from(self, statistics):
        return statistics.stats


@register_estimator
class WandaSP(_ActivationEstimator):
    name = "wanda-sp"
    summary = "Wanda-sp (An et al., FLAP paper): sum over the unit's input columns of |W_ij| * ||X_j||_2"

    def element_scores(self, weight, grad, extra=None):
        if extra is None or weight.dim() != 2:
            return torch.zeros_like(weight)
        return weight.abs() * extra["sumsq"].sqrt().to(weight.dtype)[None, :]


@register_estimator
class Flap(_ActivationEstimator):
    name = "flap"
    summary = "FLAP fluctuation: variance of input feature j over calibration tokens times ||W_:,j||^2"

    def element_scores(self, weight, grad, extra=None):
        if extra is None or weight.dim() != 2:
            return torch.zeros_like(weight)
        mean = extra["sum"] / extra["tokens"]
        variance = (extra["sumsq"] / extra["tokens"] - mean * mean).clamp_min(0)
        return weight.pow(2) * variance.to(weight.dtype)[None, :]
