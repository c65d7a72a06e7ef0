"""Configs for pruned models: stock fields for uniform widths, transformers' `per_layer_config` otherwise."""
from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from depgraph_llm.models import ArchSpec
from depgraph_llm.models import heterogeneous
from depgraph_llm.errors import UserError

MODELING_FILE = "modeling_depgraph.py"
AUTO_MAP = {"AutoConfig": "modeling_depgraph.DepgraphConfig",
            "AutoModelForCausalLM": "modeling_depgraph.DepgraphForCausalLM"}
WIDTH_KEYS = ("mlp", "q_heads", "kv_heads", "experts", "expert_mlp")


def width_fields(spec: ArchSpec, config=None) -> dict[str, str | None]:
    """Config field of each per-layer width; with `config`, only fields it has (GPT-J's config has no KV-head
    count, and the default spec's name for it must not be invented there)."""
    fields = {"mlp": spec.mlp_width_field, "q_heads": spec.q_heads_field, "kv_heads": spec.kv_heads_field,
              "experts": spec.experts_field, "expert_mlp": spec.expert_width_field}
    if config is not None:
        fields = {k: f if f and hasattr(config, f) else None for k, f in fields.items()}
    return fields


def is_uniform(widths: list[dict[str, int]]) -> bool:
    return all(len({row[k] for row in widths if k in row}) <= 1 for k in WIDTH_KEYS)


def is_heterogeneous(config_or_dict) -> bool:
    """Whether a config (object or config.json dict) names our per-layer classes in its `auto_map`."""
    auto_map = (config_or_dict.get("auto_map") if isinstance(config_or_dict, dict)
                else getattr(config_or_dict, "auto_map", None)) or {}
    return isinstance(auto_map, dict) and auto_map.get("AutoConfig") == AUTO_MAP["AutoConfig"]


def saved_per_layer_widths(config_dict: dict) -> dict:
    """The per-layer map of a config.json (our key; folders written before 2026-12 used `per_layer_config`)."""
    return config_dict.get(heterogeneous.SAVED_KEY) or config_dict.get("per_layer_config") or {}


def base_model_type(config_or_type) -> str:
    """The stock model type (checkpoints written before 2026-12 carry it with a `depgraph_` prefix)."""
    model_type = config_or_type if isinstance(config_or_type, str) else config_or_type.model_type
    return model_type[len(heterogeneous.PREFIX):] if model_type.startswith(heterogeneous.PREFIX) else model_type


def make_heterogeneous(model: nn.Module, spec: ArchSpec, widths: list[dict[str, int]]) -> None:
    """Give `model` a per_layer_config config (global fields keep the dense values) and the matching class."""
    config = model.config
    base = base_model_type(config)
    config_class, model_class = heterogeneous.register(base)
    data = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "per_layer_config"):
        data.pop(key, None)
    fields = width_fields(spec, config)
    overrides: dict[int, dict[str, int]] = {}
    for index, row in enumerate(widths):
        layer = {fields[k]: row[k] for k in WIDTH_KEYS if k in row and fields[k] and row[k] != data.get(fields[k])}
        if layer:
            overrides[index] = layer
    data["per_layer_config"] = overrides
    try:
        new_config = config_class(**data)
    except ValueError as exc:  # our own per-layer validation, or the stock validators on the global fields
        raise UserError(f"the pruned {base} cannot be described by a per-layer config ({exc}); prune fewer kinds "
                        "or see docs/new-architecture.md") from exc
    new_config.architectures = [model_class.__name__]
    new_config.auto_map = dict(AUTO_MAP)
    new_config._attn_implementation = config._attn_implementation
    model.config = new_config
    for module in model.modules():
        if getattr(module, "config", None) is config:
            module.config = new_config
    if new_config.is_heterogeneous:  # modules inside a layer read their own layer's widths, as after a reload
        for index, layer in enumerate(heterogeneous.decoder_layers(model)):
            own = heterogeneous.layer_config(new_config, index)
            for module in layer.modules():
                if getattr(module, "config", None) is new_config:
                    module.config = own
    model.__class__ = model_class  # a subclass of the stock class with no state of its own


def copy_modeling_code(config, folder: Path) -> None:
    """Put the heterogeneous modeling file (bound to the base architecture) beside the weights."""
    source = Path(heterogeneous.__file__).read_text()
    bound = re.sub(r'^BASE_MODEL_TYPE = ".*"$', f'BASE_MODEL_TYPE = "{base_model_type(config)}"', source, count=1,
                   flags=re.M)
    (folder / MODELING_FILE).write_text(bound)

