"""Estimators from input-activation statistics of each linear layer (one no-grad pass over calibration data).

Cost: one forward pass; memory: two float64 vectors per linear layer (sum and sum of squares of its inputs)."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .base import Estimator, register_estimator


@torch.no_grad()
def input_statistics(model: nn.Module, batches: list[torch.Tensor],
                     show_progress: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """{weight name: {"sum", "sumsq" (in_features,), "tokens"}} of every linear layer's input."""
    stats: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []

    def make_hook(name: str):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            entry = stats.setdefault(name, {"sum": 0, "sumsq": 0, "tokens": 0})
            entry["sum"] = entry["sum"] + x.sum(0)
            entry["sumsq"] = entry["sumsq"] + (x * x).sum(0)
            entry["tokens"] += len(x)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(make_hook(f"{name}.weight")))
    try:
        for input_ids in tqdm(batches, desc="activation statistics", disable=not show_progress, leave=False):
            model(input_ids=input_ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


class _ActivationEstimator(Estimator):
    needs_calibration = True
    consumer_only = True
    cost = "one forward pass; two vectors per linear layer"

    def prepare(self, model, batches, show_progress):
        return input_statistics(model, batches, show_progress)


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
