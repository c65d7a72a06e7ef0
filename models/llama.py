"""Llama and its close relatives: the common field names, nothing to override."""
from . import ArchSpec, register

register(ArchSpec(model_types=("llama", "mistral", "qwen2")))
