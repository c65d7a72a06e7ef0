"""Weight-only estimators: no data needed."""
from __future__ import annotations

import torch

from .base import Estimator, register_estimator


@register_estimator
class L2(Estimator):
    name = "l2"
    summary = "squared L2 norm of the unit's weights over every coupled slice (magnitude pruning)"

    def element_scores(self, weight: torch.Tensor, grad: torch.Tensor | None, extra=None) -> torch.Tensor:
        return weight.pow(2)


@register_estimator
class L1(Estimator):
    name = "l1"
    summary = "L1 norm of the unit's weights over every coupled slice"

    def element_scores(self, weight: torch.Tensor, grad: torch.Tensor | None, extra=None) -> torch.Tensor:
        return weight.abs()
