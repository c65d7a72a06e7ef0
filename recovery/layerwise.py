"""Sequential layer pipeline: push calibration batches through the decoder one layer at a time.

Only the current layer (moved to `device`) and the hidden states entering it are live, so the extra memory is
one layer plus activations whatever the depth. The stream is either the dense model's (each layer sees what the
unpruned model feeds it) or the pruned model's own (each layer sees what the already pruned and reconstructed
layers before it produce).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn


class _Captured(Exception):
    """Raised by the capture hook to stop the full-model forward once every layer's arguments are known."""


@dataclass
class LayerInputs:
    """Per calibration batch: hidden states entering layer 0, and the other arguments of every layer."""

    hidden: list[torch.Tensor]
    arguments: list[list[tuple[tuple, dict]]]  # [layer][batch] -> (args after hidden_states, kwargs)


def _to(obj, device: torch.device | None):
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor]) -> LayerInputs:
    """Run the model up to its last decoder layer once per batch, recording what every layer is called with.

    Layers may receive different arguments (e.g. sliding-window masks on some of them), so each layer's own
    call is recorded; hidden states are kept for layer 0 only (the pipeline recomputes the rest)."""
    hidden: list[torch.Tensor] = []
    arguments: list[list[tuple[tuple, dict]]] = [[] for _ in layers]
    last = len(layers) - 1

    def make_hook(index: int):
        def hook(module, args, kwargs):
            if "hidden_states" in kwargs:
                kwargs = dict(kwargs)
                states = kwargs.pop("hidden_states")
            else:
                states, args = args[0], args[1:]
            if index == 0:
                hidden.append(states.detach())
            arguments[index].append((tuple(args), dict(kwargs)))
            if index == last:
                raise _Captured
        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for input_ids in batches:
            try:
                model(input_ids=input_ids.to(_device_of(model)), use_cache=False)
            except _Captured:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return LayerInputs(hidden=hidden, arguments=arguments)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def run_layer(layer: nn.Module, states: list[torch.Tensor], arguments: list[tuple[tuple, dict]],
              device: torch.device | None = None, keep_output: bool = True) -> list[torch.Tensor]:
    """One layer on every batch of a stream; returns the output stream (on the stream's device)."""
    outputs = []
    for hidden, (args, kwargs) in zip(states, arguments):
        out = layer(_to(hidden, device), *_to(args, device), **_to(kwargs, device))
        out = out[0] if isinstance(out, tuple) else out
        if keep_output:
            outputs.append(out.to(hidden.device))
    return outputs


class Recorder:
    """Forward hooks that hand a linear layer's inputs (flattened to tokens x features) to a callback."""

    def __init__(self) -> None:
        self.handles = []

    def inputs(self, module: nn.Module, callback: Callable[[torch.Tensor], None]) -> None:
        self.handles.append(module.register_forward_hook(
            lambda m, args, out: callback(args[0].reshape(-1, args[0].shape[-1]))))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def layer_iterator(layers: nn.ModuleList, device: torch.device | None) -> Iterator[tuple[int, nn.Module]]:
    """Yield layers one at a time, moved to `device` while in use and back afterwards."""
    for index, layer in enumerate(layers):
        home = _device_of(layer)
        if device is not None:
            layer.to(device)
        try:
            yield index, layer
        finally:
            if device is not None:
                layer.to(home)
