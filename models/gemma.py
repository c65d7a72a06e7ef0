"""Gemma 1/2/3: embeddings are scaled by sqrt(hidden_size), computed from the config when the model is built,
so a checkpoint with fewer hidden channels would reload with a different scale: hidden pruning is refused.
Tied embeddings, soft-capping, sliding windows and q/k norms need nothing here (the trace covers them)."""
from . import ArchSpec, register

register(ArchSpec(model_types=("gemma", "gemma2", "gemma3_text"), hidden_prunable=False,
                  hidden_note="its embedding scale is sqrt(hidden_size), recomputed from the config on load"))
