"""Training-based recovery: one registry (`base.py`) and one small module per trainer."""
from . import full, lora, masked  # noqa: F401 - each registers itself
from .base import TRAINERS, StepInfo, Trainer, TrainResult, TrainSettings, get_trainer, train

__all__ = ["TRAINERS", "StepInfo", "Trainer", "TrainResult", "TrainSettings", "get_trainer", "train"]
