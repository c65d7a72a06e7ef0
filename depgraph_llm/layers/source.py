"""Where decoder layers come from: the source hands out layer i (materialised, on the work device) and the
calibration inputs of every layer, captured by running the model with its decoder layers replaced by stubs
(embeddings, rotary tables and masks come from the model itself, no layer weight is needed)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass
class LayerInputs:
    """Per calibration batch: hidden states entering layer 0, and the other arguments of every layer."""

    hidden: list[torch.Tensor]
    arguments: list[list[tuple[tuple, dict]]]  # [layer][batch] -> (args after hidden_states, kwargs)


class _Stop(Exception):
    """Raised by the last stub to end a capture forward once every layer's arguments are known."""


class _Stub(nn.Module):
    """Stands in for decoder layer `index`: records its call, returns its input (or a replayed output)."""

    def __init__(self, index: int, recorder, as_tuple: bool, original: nn.Module) -> None:
        super().__init__()
        self.index, self.recorder, self.as_tuple = index, recorder, as_tuple
        self.__dict__["_original"] = original  # not a submodule: its weights stay out of the stub

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # the model may read layer attributes (e.g. attention_type to pick a mask)
            return getattr(self.__dict__["_original"], name)

    def forward(self, *args, **kwargs):
        if "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            states = kwargs.pop("hidden_states")
        else:
            states, args = args[0], args[1:]
        out = self.recorder(self.index, states, tuple(args), kwargs)
        return (out,) if self.as_tuple else out


@contextlib.contextmanager
def stubbed_layers(model: nn.Module, layers_path: str, count: int, recorder, as_tuple: bool) -> Iterator[None]:
    """Temporarily replace the model's decoder-layer list by `count` stubs calling `recorder`."""
    parent_path, _, attr = layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    original = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList(_Stub(i, recorder, as_tuple, original[i]) for i in range(count)))
    try:
        yield
    finally:
        setattr(parent, attr, original)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's input embeddings (where input ids must go)."""
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def capture_inputs(model: nn.Module, layers_path: str, count: int, batches: list[torch.Tensor],
                   as_tuple: bool) -> LayerInputs:
    """Run the model with stub layers once per batch, recording what every layer is called with.

    Layers may receive different arguments (e.g. sliding-window masks on some of them), so each layer's own
    call is recorded; hidden states are kept for layer 0 only (the pipeline computes the rest)."""
    hidden: list[torch.Tensor] = []
    arguments: list[list[tuple[tuple, dict]]] = [[] for _ in range(count)]

    def record(index, states, args, kwargs):
        if index == 0:
            hidden.append(states.detach())
        arguments[index].append((args, dict(kwargs)))
        if index == count - 1:
            raise _Stop
        return states

    with stubbed_layers(model, layers_path, count, record, as_tuple):
        for input_ids in batches:
            try:
                model(input_ids=input_ids.to(model_device(model)), use_cache=False)
            except _Stop:
                pass
    return LayerInputs(hidden=hidden, arguments=arguments)


@torch.no_grad()
def first_call(model: nn.Module, layers_path: str, count: int, input_ids: torch.Tensor) -> tuple:
    """(hidden, args, kwargs) of layer 0's call on one batch (to learn what a layer returns)."""
    seen = []

    def record(index, states, args, kwargs):
        seen.append((states, args, kwargs))
        raise _Stop

    with stubbed_layers(model, layers_path, count, record, False):
        try:
            model(input_ids=input_ids.to(model_device(model)), use_cache=False)
        except _Stop:
            pass
    return seen[0]


def tail_forward(model: nn.Module, layers_path: str, count: int, input_ids: torch.Tensor,
                 final: torch.Tensor, as_tuple: bool, **kwargs):
    """The model's forward with the decoder layers replayed: the last layer returns `final` (the stream's
    output), so the final norm, LM head and loss run on it; returns the model output."""
    def replay(index, states, args, kw):
        return final.to(states.device) if index == count - 1 else states

    with stubbed_layers(model, layers_path, count, replay, as_tuple):
        return model(input_ids=input_ids.to(model_device(model)), use_cache=False, **kwargs)


class LayerSource(Protocol):
    """Hands out decoder layers one at a time, and the model around them (embeddings, norm, head)."""

    model: nn.Module  # the model; its decoder layers may be unmaterialised (meta) in a streaming source
    layers_path: str
    device: torch.device | None

    def __len__(self) -> int: ...

    def load(self, index: int) -> nn.Module: ...

    def release(self, index: int, layer: nn.Module) -> None: ...


class InMemorySource:
    """Layers of a model already in memory; each visits `device` (when given) while in use."""

    def __init__(self, model: nn.Module, layers_path: str, device: torch.device | None = None) -> None:
        self.model, self.layers_path, self.device = model, layers_path, device
        self.layers: nn.ModuleList = model.get_submodule(layers_path)
        self._home: dict[int, torch.device] = {}

    def __len__(self) -> int:
        return len(self.layers)

    def load(self, index: int) -> nn.Module:
        layer = self.layers[index]
        if self.device is not None:
            self._home[index] = next(layer.parameters()).device
            layer.to(self.device)
        return layer

    def release(self, index: int, layer: nn.Module) -> None:
        if self.device is not None:
            layer.to(self._home.pop(index))
