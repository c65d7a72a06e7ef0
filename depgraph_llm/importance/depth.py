"""Layer importance for depth pruning, from hidden states on calibration text.

- Block Influence (ShortGPT): 1 - mean cosine(input, output) of each decoder layer; low = the layer barely
  changes the residual stream.
- Angular distance (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers"): arccos of the
  cosine between the hidden states before layer l and before layer l+n, over pi; the n-layer block starting
  where it is smallest is the most removable.
Cost: forward passes only (no gradients), one hidden-state tensor per layer boundary per batch.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _boundary_states(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Hidden states entering each layer, plus the output of the last one (len(layers) + 1 tensors)."""
    states: list[torch.Tensor] = []
    hooks = []

    def grab_input(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        states.append(hidden.detach().float())

    def grab_output(module, args, kwargs, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        states.append(hidden.detach().float())

    for layer in layers:
        hooks.append(layer.register_forward_pre_hook(grab_input, with_kwargs=True))
    hooks.append(layers[-1].register_forward_hook(grab_output, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return states


def block_influence(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor]) -> torch.Tensor:
    """Per layer: 1 - mean over tokens of cosine(layer input, layer output)."""
    totals = torch.zeros(len(layers), dtype=torch.float64)
    tokens = 0
    for input_ids in batches:
        states = _boundary_states(model, layers, input_ids)
        for i in range(len(layers)):
            cosine = torch.nn.functional.cosine_similarity(states[i], states[i + 1], dim=-1)
            totals[i] += (1 - cosine).double().sum()
        tokens += input_ids.numel()
    return totals / max(tokens, 1)


def angular_distances(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor]) -> torch.Tensor:
    """(L+1, L+1) matrix: entry [i, j] = mean arccos(cosine(h_i, h_j)) / pi over tokens (one pass per batch)."""
    boundaries = len(layers) + 1
    totals = torch.zeros(boundaries, boundaries, dtype=torch.float64)
    tokens = 0
    for input_ids in batches:
        states = _boundary_states(model, layers, input_ids)
        for i in range(boundaries):
            for j in range(i + 1, boundaries):
                cosine = torch.nn.functional.cosine_similarity(states[i], states[j], dim=-1)
                totals[i, j] += (torch.arccos(cosine.clamp(-1, 1)) / math.pi).double().sum()
        tokens += input_ids.numel()
    return totals / max(tokens, 1)


def angular_distance(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor], span: int,
                     matrix: torch.Tensor | None = None) -> torch.Tensor:
    """Per start layer l (0..L-span): mean arccos(cosine(h_l, h_{l+span})) / pi."""
    matrix = angular_distances(model, layers, batches) if matrix is None else matrix
    return torch.stack([matrix[start, start + span] for start in range(len(layers) - span + 1)])
