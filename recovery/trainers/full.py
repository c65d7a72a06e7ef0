"""`full`: plain fine-tuning of every slim weight (small models, and the reference the others compare to)."""
from __future__ import annotations

from torch import nn

from .base import Trainer, TrainSettings, register


@register("full")
class FullTrainer(Trainer):
    """Every parameter of the slim model trains."""

    def prepare(self, model: nn.Module, settings: TrainSettings) -> nn.Module:
        for param in model.parameters():
            param.requires_grad_(True)
        return model

    def finish(self, model: nn.Module) -> nn.Module:
        for param in model.parameters():
            param.requires_grad_(False)
        return model
