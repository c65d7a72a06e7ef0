"""`lora`: peft LoRA on every linear layer of the slim model, merged into its weights at the end (same shapes,
same parameter count); the adapter folder can be kept too (loads with `PeftModel.from_pretrained`)."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .base import Trainer, TrainSettings, register


def lora_config(settings: TrainSettings):
    """LoRA on every nn.Linear except the output head (tied to the embedding in many models)."""
    from peft import LoraConfig

    return LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")


@register("lora")
class LoraTrainer(Trainer):
    """Only the low-rank adapters train; `finish` merges them."""

    def __init__(self, adapter_base: str | None = None) -> None:
        self.adapter_base = adapter_base  # recorded in the adapter's config as the model it applies to

    def prepare(self, model: nn.Module, settings: TrainSettings) -> nn.Module:
        from peft import get_peft_model

        for param in model.parameters():
            param.requires_grad_(False)
        return get_peft_model(model, lora_config(settings))

    def save_adapter(self, model: nn.Module, folder: Path) -> bool:
        model.save_pretrained(folder)
        if self.adapter_base:
            import json

            config_path = folder / "adapter_config.json"
            config = json.loads(config_path.read_text())
            config["base_model_name_or_path"] = self.adapter_base
            config_path.write_text(json.dumps(config, indent=2) + "\n")
        return True

    def finish(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()
