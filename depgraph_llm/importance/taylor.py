"""First-order Taylor estimators (LLM-Pruner): the loss change from zeroing weights, |w * dL/dw|."""
from __future__ import annotations

import torch

from .base import Estimator, register_estimator


@register_estimator
class TaylorElement(Estimator):
    name = "taylor"
    needs_gradients = True
    loss_scaled = True
    summary = "element-wise first-order Taylor: sum over the unit of |w * grad| (LLM-Pruner 'param_first')"

    def element_scores(self, weight: torch.Tensor, grad: torch.Tensor | None, extra=None) -> torch.Tensor:
        return (weight * grad).abs() if grad is not None else torch.zeros_like(weight)


@register_estimator
class TaylorVector(Estimator):
    name = "taylor-vector"
    needs_gradients = True
    loss_scaled = True
    signed = True
    summary = "vector-wise first-order Taylor: |sum over the unit of w * grad| (LLM-Pruner 'vector')"

    def element_scores(self, weight: torch.Tensor, grad: torch.Tensor | None, extra=None) -> torch.Tensor:
        return weight * grad if grad is not None else torch.zeros_like(weight)
