"""Give a model's linear layers (zero) biases through its own config switches, for FLAP-style compensation.

The compensation needs a bias on the layers that lose input channels (o_proj, down_proj). A checkpoint can
only carry one if the architecture's config has a switch that makes the stock modeling code create it
(Llama: `attention_bias`, `mlp_bias`). Which switches exist is data in `models/` (`ArchSpec.bias_switches`);
whether the modeling code honours them is checked by building the model on the meta device.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from depgraph_llm.errors import UserError


def enable_zero_biases(model: nn.Module, switches: tuple[str, ...]) -> list[str]:
    """Turn on every bias switch the config has and add the zero biases the modeling code would create.

    Returns the names of the new bias parameters; the model computes exactly what it did before."""
    config = copy.deepcopy(model.config)
    present = [s for s in switches if hasattr(config, s)]
    for switch in present:
        setattr(config, switch, True)
    expected: set[str] = set()
    if present:
        with torch.device("meta"):
            probe = type(model)(config)
        expected = {name for name, _ in probe.named_parameters()}
    added = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.bias is None and f"{name}.bias" in expected:
            weight = module.weight
            module.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
            added.append(f"{name}.bias")
    if not added:
        raise UserError(f"{model.config.model_type}'s config cannot store a bias on its output projections, so "
                        "--reconstruct bias has nowhere to put the compensation; use --reconstruct ls")
    for switch in present:
        setattr(model.config, switch, True)
    return added
