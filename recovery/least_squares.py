"""Retrain-free reconstruction by least squares ("local" mode): after choosing which input channels of a linear
layer survive (MLP channels of down_proj, heads of o_proj), refit that layer's weights so its output on
calibration activations of the dense model matches the dense output as closely as possible:

    W' = argmin ||X_kept W'^T - Y||^2 + damp * mean(diag(X_kept^T X_kept)) * ||W'||^2

Only the Gram matrix X^T X and X^T Y are accumulated (float64), never the activations themselves.
"""
from __future__ import annotations

import torch
from torch import nn


def consumer_layers(model: nn.Module, masks: dict[tuple[str, int], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Linear layers whose input axis loses channels: {module name: kept input indices}."""
    modules = dict(model.named_modules())
    out = {}
    for (param, axis), keep in masks.items():
        module_name, _, attr = param.rpartition(".")
        module = modules.get(module_name)
        if axis == 1 and attr == "weight" and isinstance(module, nn.Linear) and not bool(keep.all()):
            out[module_name] = keep.nonzero().flatten()
    return out


@torch.no_grad()
def least_squares_weights(model: nn.Module, kept_inputs: dict[str, torch.Tensor], batches: list[torch.Tensor],
                          damp: float = 0.01) -> dict[str, torch.Tensor]:
    """New weights (out, kept) for every layer in `kept_inputs`, fitted on the dense model's activations."""
    modules = dict(model.named_modules())
    gram: dict[str, torch.Tensor] = {}
    cross: dict[str, torch.Tensor] = {}
    hooks = []

    def make_hook(name: str, kept: torch.Tensor):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).double()[:, kept]
            y = output.reshape(-1, output.shape[-1]).double()
            if module.bias is not None:
                y = y - module.bias.double()
            gram[name] = gram.get(name, 0) + x.T @ x
            cross[name] = cross.get(name, 0) + x.T @ y
        return hook

    for name, kept in kept_inputs.items():
        hooks.append(modules[name].register_forward_hook(make_hook(name, kept)))
    try:
        for input_ids in batches:
            model(input_ids=input_ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    weights = {}
    for name in kept_inputs:
        g = gram[name]
        ridge = damp * g.diagonal().mean().clamp_min(1e-12)
        solution = torch.linalg.solve(g + ridge * torch.eye(len(g), dtype=g.dtype), cross[name])
        weights[name] = solution.T.to(modules[name].weight.dtype)
    return weights


def assign_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy fitted weights into the (already sliced) layers."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, weight in weights.items():
            modules[name].weight.copy_(weight)
