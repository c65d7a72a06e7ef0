"""Layer importance for depth pruning, from hidden states on calibration text.

- Block Influence (ShortGPT): 1 - mean cosine(input, output) of each decoder layer; low = the layer barely
  changes the residual stream.
- Angular distance (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers"): arccos of the
  cosine between the hidden states before layer l and before layer l+n, over pi; the n-layer block starting
  where it is smallest is the most removable.
Cost: one layer-pipeline pass (no gradients); angular distance keeps one hidden-state tensor per layer boundary
per batch.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from depgraph_llm.layers import InMemorySource, LayerCallback, LayerPipeline, LayerSource, LayerStep
from depgraph_llm.layers.callbacks import BoundaryStates


class BlockInfluence(LayerCallback):
    """Per layer: the sum over tokens of 1 - cosine(layer input, layer output), and the token count."""

    def __init__(self, layers: int) -> None:
        self.totals = torch.zeros(layers, dtype=torch.float64)
        self.tokens = 0

    def after_layer(self, step: LayerStep) -> None:
        for hidden, out in zip(step.stream, step.outputs):
            cosine = torch.nn.functional.cosine_similarity(hidden.detach().float(), out.detach().float(), dim=-1)
            self.totals[step.index] += (1 - cosine).double().sum().cpu()
            if step.index == 0:
                self.tokens += hidden.shape[:-1].numel()


def _source(model: nn.Module, layers: nn.ModuleList) -> InMemorySource:
    path = next(name for name, module in model.named_modules() if module is layers)
    return InMemorySource(model, path)


def block_influence(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor],
                    source: LayerSource | None = None) -> torch.Tensor:
    """Per layer: 1 - mean over tokens of cosine(layer input, layer output) (`source`: e.g. a streaming one)."""
    influence = BlockInfluence(len(layers))
    LayerPipeline(source or _source(model, layers), [influence]).run(batches)
    return influence.totals / max(influence.tokens, 1)


def angular_matrix(states: list[list[torch.Tensor]]) -> torch.Tensor:
    """(L+1, L+1) matrix from boundary states [batch][boundary]: [i, j] = mean arccos(cosine(h_i, h_j)) / pi."""
    boundaries = len(states[0]) if states else 1
    totals = torch.zeros(boundaries, boundaries, dtype=torch.float64)
    tokens = 0
    for per_batch in states:
        for i in range(boundaries):
            for j in range(i + 1, boundaries):
                cosine = torch.nn.functional.cosine_similarity(per_batch[i], per_batch[j], dim=-1)
                totals[i, j] += (torch.arccos(cosine.clamp(-1, 1)) / math.pi).double().sum()
        tokens += per_batch[0].shape[:-1].numel()
    return totals / max(tokens, 1)


def angular_distances(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor],
                      source: LayerSource | None = None) -> torch.Tensor:
    """(L+1, L+1) matrix: entry [i, j] = mean arccos(cosine(h_i, h_j)) / pi over tokens (one layer-pipeline pass)."""
    boundaries = BoundaryStates()
    LayerPipeline(source or _source(model, layers), [boundaries]).run(batches)
    return angular_matrix(boundaries.states)


def angular_distance(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor], span: int,
                     matrix: torch.Tensor | None = None) -> torch.Tensor:
    """Per start layer l (0..L-span): mean arccos(cosine(h_l, h_{l+span})) / pi."""
    matrix = angular_distances(model, layers, batches) if matrix is None else matrix
    return torch.stack([matrix[start, start + span] for start in range(len(layers) - span + 1)])
