"""Compatibility names for the sequential layer pipeline, which now lives in `depgraph_llm.layers`.

Only the current layer (moved to `device`) and the hidden states entering it are live, so the extra memory is
one layer plus activations whatever the depth."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from depgraph_llm.layers.callbacks import Recorder
from depgraph_llm.layers.pipeline import run_layer
from depgraph_llm.layers.source import LayerInputs, capture_inputs, first_call

__all__ = ["LayerInputs", "Recorder", "capture_layer_inputs", "layer_iterator", "run_layer"]


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor]) -> LayerInputs:
    """What every decoder layer is called with on each batch (hidden states for layer 0 only)."""
    path = next(name for name, module in model.named_modules() if module is layers)
    hidden, args, kwargs = first_call(model, path, len(layers), batches[0][:, :2])
    as_tuple = isinstance(layers[0](hidden, *args, **kwargs), tuple)
    return capture_inputs(model, path, len(layers), batches, as_tuple)


def layer_iterator(layers: nn.ModuleList, device: torch.device | None) -> Iterator[tuple[int, nn.Module]]:
    """Yield layers one at a time, moved to `device` while in use and back afterwards."""
    for index, layer in enumerate(layers):
        home = next(layer.parameters()).device
        if device is not None:
            layer.to(device)
        try:
            yield index, layer
        finally:
            if device is not None:
                layer.to(home)
