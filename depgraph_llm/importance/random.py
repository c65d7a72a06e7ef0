"""A control: random scores (under the run's seed). Any real estimator should beat it."""
from __future__ import annotations

import torch

from .base import Estimator, register_estimator


@register_estimator
class Random(Estimator):
    name = "random"
    summary = "uniform random scores per element, summed per unit: the floor every estimator must beat"
    row_wise = False  # the generator's draws depend on the tensor scored: score it whole

    def element_scores(self, weight: torch.Tensor, grad: torch.Tensor | None, extra=None) -> torch.Tensor:
        return torch.rand_like(weight)
