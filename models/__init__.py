"""Per-architecture knowledge that a trace cannot give, as data: config field names and attributes to update.

Adding an architecture is one small file in this package that calls `register(ArchSpec(...))`; a model whose
config uses the common field names needs none (the default spec is used).
"""
from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    """Where an architecture keeps its widths in the config and on its attention modules."""

    model_types: tuple[str, ...]
    mlp_width_field: str = "intermediate_size"
    q_heads_field: str = "num_attention_heads"
    kv_heads_field: str | None = "num_key_value_heads"
    head_dim_field: str | None = "head_dim"
    hidden_field: str = "hidden_size"
    # other fields that hold the hidden width when they equal it (OPT's word_embed_proj_dim)
    hidden_alias_fields: tuple[str, ...] = ()
    layers_field: str = "num_hidden_layers"
    per_layer_fields: tuple[str, ...] = ("layer_types",)
    # config switches that give linear layers a bias (FLAP-style compensation needs one on o_proj/down_proj)
    bias_switches: tuple[str, ...] = ("attention_bias", "mlp_bias")
    # called as f(model, old_hidden, new_hidden) after hidden channels are removed, to fold into the weights what
    # the modeling code derives from hidden_size (Gemma's embedding scale), so a stock config still describes it
    after_hidden_pruning: Callable[[nn.Module, int, int], None] | None = None
    # attribute on the attention module -> which count it holds: "q_heads", "kv_heads", "q_per_kv", "q_width"
    # (query heads x head_dim, e.g. GPT-2's split_size) or "kv_width" (KV heads x head_dim)
    attention_attrs: dict[str, str] = field(default_factory=lambda: {
        "num_heads": "q_heads", "num_attention_heads": "q_heads", "num_key_value_heads": "kv_heads",
        "num_key_value_groups": "q_per_kv"})
    # mixture of experts: config fields of the routed-expert count, the experts' shared intermediate width and the
    # experts used per token (clipped to the experts left); attributes of the MoE block's modules -> which count
    experts_field: str | None = None
    expert_width_field: str | None = None
    top_k_field: str = "num_experts_per_tok"
    expert_attrs: dict[str, str] = field(default_factory=lambda: {
        "num_experts": "experts", "top_k": "top_k", "intermediate_dim": "expert_mlp", "hidden_dim": "hidden"})


DEFAULT_SPEC = ArchSpec(model_types=())
ARCHITECTURES: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    """Register `spec` for each of its model types."""
    for model_type in spec.model_types:
        ARCHITECTURES[model_type] = spec
    return spec


def spec_for(model_type: str) -> ArchSpec:
    """The spec registered for `model_type`, or the default one for Llama-like configs."""
    _load_all()
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        log.info("no models/ entry for model_type %r: using the default field names", model_type)
        return DEFAULT_SPEC
    return spec


_loaded = False


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True


def supported_model_types() -> list[str]:
    """Model types with an entry here (tested in the conformance matrix)."""
    _load_all()
    return sorted(ARCHITECTURES)


def nearest_supported(model_type: str) -> str:
    """The registered model type closest to `model_type` by spelling (for error messages)."""
    import difflib

    types = supported_model_types()
    match = difflib.get_close_matches(model_type, types, n=1, cutoff=0.0)
    return match[0] if match else "llama"
