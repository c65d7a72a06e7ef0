"""Per-layer widths for a stock Hugging Face decoder: config + modeling classes that subclass the stock ones.

In memory the config uses transformers' own `per_layer_config` (a sparse map from layer index to the fields that
differ from the global value); config.json stores that map under `SAVED_KEY` with the stock model_type, so tools
that only read the config (AutoTokenizer) see a plain homogeneous config. `auto_map` names this file, copied into
every heterogeneous checkpoint, so `from_pretrained(dir, trust_remote_code=True)` works where depgraph-llm is not
installed; with depgraph-llm, `depgraph_llm.load_pruned(dir)` builds the same classes locally, no remote code.

What no config field can say (GPT-2 and OPT derive head_dim = hidden / heads) is in `config.module_overrides`:
parameter shapes and module attributes, set right after the modules are built, before any weight is loaded or
initialised.

This file must import nothing but torch and transformers. `BASE_MODEL_TYPE` is rewritten when it is copied.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.utils import logging
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

BASE_MODEL_TYPE = "llama"
PREFIX = "depgraph_"
# config.json holds the per-layer map under this key, not `per_layer_config`: stock config classes (which read
# config.json for the stock model_type, e.g. inside AutoTokenizer) validate per-layer head counts through the
# global fields and fail or warn, so they must see a homogeneous config with the dense values.
SAVED_KEY = "depgraph_per_layer_config"
_CLASSES: dict[str, tuple[type, type]] = {}


@contextlib.contextmanager
def _global_reads_allowed():
    """Silence transformers' warning that a global per-layer field is read: the stock validators and the stock
    model's constructor read the dense values, which these classes allow on purpose (each layer is then rebuilt
    from its own config)."""
    heterogeneity_log = logging.get_logger("transformers.integrations.heterogeneity.configuration_utils")
    level = heterogeneity_log.level
    heterogeneity_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        heterogeneity_log.setLevel(level)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (the one holding the most parameters)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def layer_config(config, index: int):
    """Layer `index`'s own config (transformers' per_layer_config view) with the model's attention backend."""
    layer = config.per_layer_config[index]
    layer._attn_implementation = config._attn_implementation  # a per-layer copy does not inherit it
    return layer


def apply_module_overrides(model: nn.Module, overrides: dict | None) -> bool:
    """Give the freshly built modules the parameter shapes and attributes of the pruned model."""
    if not overrides:
        return False
    for name, shape in overrides.get("parameters", {}).items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        old = getattr(module, attr)
        setattr(module, attr, nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device),
                                           requires_grad=old.requires_grad))
    for module_name, attrs in overrides.get("attributes", {}).items():
        module = model.get_submodule(module_name)
        for attr, value in attrs.items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    return True


def make_classes(base_model_type: str) -> tuple[type, type]:
    """(config class, causal-LM class) of the heterogeneous variant of `base_model_type`."""
    if base_model_type in _CLASSES:
        return _CLASSES[base_model_type]
    base_config = CONFIG_MAPPING[base_model_type]
    base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]

    class HeterogeneousConfig(base_config):
        # the stock type, so that tools which only read config.json (AutoTokenizer, AutoConfig) need no remote
        # code; `auto_map` and `architectures` name these classes, and stock modeling refuses the per-layer fields
        model_type = base_model_type

        def __init__(self, **kwargs):
            # The global fields hold the dense model's values, which the stock validators accept; stock modeling
            # code may read them (e.g. to size caches), so allow that: every layer is built from its own config.
            self.__dict__["allow_global_per_layer_attribute_access"] = True
            if SAVED_KEY in kwargs:
                kwargs["per_layer_config"] = kwargs.pop(SAVED_KEY)
            with _global_reads_allowed():
                super().__init__(**kwargs)
            for index in range(self.num_hidden_layers if self.is_heterogeneous else 0):
                layer = self.per_layer_config[index]
                q = getattr(layer, "num_attention_heads", None)
                kv = getattr(layer, "num_key_value_heads", None) or q
                if q and kv and q % kv:
                    raise ValueError(f"layer {index}: {q} query heads do not split evenly over {kv} KV heads")

        def _update_heterogeneous_to_dict_output(self, data: dict) -> None:  # transformers' serialisation hook
            super()._update_heterogeneous_to_dict_output(data)
            data.pop("allow_global_per_layer_attribute_access", None)  # an opt-in of our classes only
            if "per_layer_config" in data:
                data[SAVED_KEY] = data.pop("per_layer_config")

    class HeterogeneousForCausalLM(base_model):
        config_class = HeterogeneousConfig

        def __init__(self, config):
            with _global_reads_allowed():
                super().__init__(config)
            rebuilt = bool(config.is_heterogeneous)
            if rebuilt:
                layers = decoder_layers(self)
                layer_class = type(layers[0])
                for index in range(len(layers)):
                    layers[index] = layer_class(layer_config(config, index), index)
            if apply_module_overrides(self, getattr(config, "module_overrides", None)) or rebuilt:
                self.post_init()

    HeterogeneousConfig.__name__ = HeterogeneousConfig.__qualname__ = "DepgraphConfig"
    HeterogeneousForCausalLM.__name__ = HeterogeneousForCausalLM.__qualname__ = "DepgraphForCausalLM"
    _CLASSES[base_model_type] = (HeterogeneousConfig, HeterogeneousForCausalLM)
    return _CLASSES[base_model_type]


def register(base_model_type: str) -> tuple[type, type]:
    """Make the classes and register the model class with AutoModelForCausalLM for our config class (for loading
    without remote code; AutoConfig keeps the stock class for the stock type, so the config is built directly)."""
    config_class, model_class = make_classes(base_model_type)
    AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
    return config_class, model_class


DepgraphConfig, DepgraphForCausalLM = make_classes(BASE_MODEL_TYPE)
