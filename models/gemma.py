"""Gemma 1/2/3: embeddings are multiplied by sqrt(hidden_size), a scale the modeling code derives from the config.
After hidden channels are removed the ratio of the old to the new scale is folded into the (tied) embedding and
the final norm, so the checkpoint keeps a stock config. Soft-capping, sliding windows and q/k norms need nothing
here (the trace covers them)."""
import math

import torch
from torch import nn

from . import ArchSpec, register


@torch.no_grad()
def fold_embedding_scale(model: nn.Module, old_hidden: int, new_hidden: int) -> None:
    """Keep the function of the pruned model under the scale sqrt(new_hidden) a stock config rebuilds: inputs
    through embedding weights x ratio, logits (tied LM head) through the final norm's (1 + w) / ratio."""
    ratio = math.sqrt(old_hidden / new_hidden)
    embedding = model.get_input_embeddings()
    embedding.weight.mul_(ratio)
    embedding.scalar_embed_scale = math.sqrt(new_hidden)
    embedding.embed_scale.fill_(math.sqrt(new_hidden))
    if model.get_output_embeddings().weight is embedding.weight:
        norm = model.model.norm  # Gemma's RMSNorm scales by (1 + weight)
        norm.weight.copy_((1 + norm.weight.float()) / ratio - 1)


register(ArchSpec(model_types=("gemma", "gemma2", "gemma3_text"), after_hidden_pruning=fold_embedding_scale))
