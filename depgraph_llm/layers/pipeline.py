"""One loop over decoder layers: the source hands out layer i with its calibration stream, callbacks gather what
their stage needs (statistics, reconstruction, depth metrics), the sink slices / writes it, and the stream moves
on to layer i + 1. Only the current layer and the hidden states entering it are live."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .source import LayerInputs, LayerSource, capture_inputs, first_call, tail_forward


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
def run_layer(layer: nn.Module, states: list[torch.Tensor], arguments: list[tuple[tuple, dict]],
              device: torch.device | None = None, keep_output: bool = True, store=None) -> list[torch.Tensor]:
    """One layer on every batch of a stream; returns the output stream (on the stream's device; in the files of a
    SpilledList when `store`, an ActivationStore, says the stream exceeds its budget)."""
    outputs = store.new(len(states), _nbytes(states[0])) if store is not None and len(states) else []
    for hidden, (args, kwargs) in zip(states, arguments):
        out = layer(_to(hidden, device), *_to(args, device), **_to(kwargs, device))
        out = out[0] if isinstance(out, tuple) else out
        if keep_output:
            outputs.append(out.to(hidden.device))
    return outputs


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass
class LayerStep:
    """Layer `index` during its visit: its module, the stream entering it and (after the dense run) leaving it."""

    index: int
    name: str                               # "model.layers.3"
    layer: nn.Module
    stream: list[torch.Tensor]
    arguments: list[tuple[tuple, dict]]
    device: torch.device | None = None
    outputs: list[torch.Tensor] | None = None      # the layer's outputs on `stream` (None: not run)
    next_stream: list[torch.Tensor] | None = None  # what enters the next layer; defaults to `outputs`
    skip_run: bool = False                  # set in before_layer: do not run the layer (it is removed)
    store: object = None                    # ActivationStore: where output streams go (memory or disk)

    def rerun(self) -> list[torch.Tensor]:
        """The layer's outputs on the entering stream, with its current weights."""
        return run_layer(self.layer, self.stream, self.arguments, self.device, store=self.store)


class LayerCallback:
    """Hooks of one stage into the pipeline; every method is optional."""

    def start(self, model: nn.Module, layers_path: str) -> None:
        """Before anything runs (e.g. hook modules outside the decoder layers)."""

    def before_layer(self, step: LayerStep) -> None:
        """Before the layer's dense run (register hooks on step.layer, or set step.skip_run)."""

    def after_layer(self, step: LayerStep) -> None:
        """After the dense run (step.outputs): gather, solve, and possibly set step.next_stream."""

    def tail(self, model: nn.Module, output, input_ids: torch.Tensor) -> None:
        """With `needs_tail`: the model output on one batch, the decoder layers replayed from the stream."""

    def finish(self) -> None:
        """After the last layer (remove hooks, finalise results)."""

    def phase(self, name: str) -> None:
        """What the model runs next: "probe" (one short call), "capture" (embeddings up to the layers),
        "layers", "tail" (final norm and head on the stream); hooks outside the layers gate on it."""

    needs_tail: bool = False
    tail_kwargs: Callable[[torch.Tensor], dict] | None = None  # extra model kwargs per batch (e.g. labels)


class LayerSink:
    """Receives each layer once every callback is done with it (slice, write); default does nothing."""

    def write(self, index: int, name: str, layer: nn.Module) -> None:
        """Layer `index` is final."""

    def finish(self) -> None:
        """Every layer has been written."""


@dataclass
class LayerPipeline:
    """`run(batches)`: capture layer inputs, visit every layer (callbacks, then sink), run the model's tail."""

    source: LayerSource
    callbacks: list[LayerCallback] = field(default_factory=list)
    sink: LayerSink = field(default_factory=LayerSink)
    progress: Callable[[Iterable, int], Iterable] | None = None  # e.g. a tqdm factory from the CLI layer

    @torch.no_grad()
    def run(self, batches: list[torch.Tensor]) -> None:
        """One pass over the layers (no autograd; a callback that needs it enables it); without batches the
        layers go straight from the source to the sink."""
        source, model = self.source, self.source.model
        count = len(source)
        for callback in self.callbacks:
            callback.start(model, source.layers_path)
        inputs, as_tuple = LayerInputs(hidden=[], arguments=[[] for _ in range(count)]), False
        indices: Iterable[int] = range(count)
        if self.progress is not None:
            indices = self.progress(indices, count)
        layer = None
        try:
            for index in indices:
                layer = source.load(index)
                if batches and index == 0:
                    self._phase("probe")
                    as_tuple = self._returns_tuple(layer, batches[0])
                    self._phase("capture")
                    inputs = capture_inputs(model, source.layers_path, count, batches, as_tuple)
                    inputs.hidden = self._stored(inputs.hidden)
                    self._phase("layers")
                if index == 0:
                    self._outside("park_outside")
                step = LayerStep(index, f"{source.layers_path}.{index}", layer, inputs.hidden,
                                 inputs.arguments[index], source.device, store=getattr(source, "activations", None))
                self._visit(step, bool(batches))
                self.sink.write(index, step.name, layer)
                source.release(index, layer)
                inputs.hidden = step.next_stream if step.next_stream is not None else step.stream
                inputs.arguments[index] = []
        finally:
            self._outside("restore_outside")
        if batches and any(c.needs_tail for c in self.callbacks):
            self._phase("tail")
            self._tail(batches, inputs.hidden, as_tuple)
        for callback in self.callbacks:
            callback.finish()
        self.sink.finish()

    def _stored(self, stream: list[torch.Tensor]) -> list[torch.Tensor]:
        """The captured stream, moved to disk when the source's activation store says it exceeds its budget."""
        store = getattr(self.source, "activations", None)
        if store is None or not stream:
            return stream
        kept = store.new(len(stream), _nbytes(stream[0]))
        if isinstance(kept, list):
            return stream
        for tensor in stream:
            kept.append(tensor)
        return kept

    def _outside(self, action: str) -> None:
        """A streaming source parks the parameters outside the decoder layers (embeddings, head) on disk while
        the layers run, once their inputs are captured, and reads them back before the tail and the callbacks'
        finish (nothing in the layer loop reads them); other sources have no such methods."""
        method = getattr(self.source, action, None)
        if method is not None:
            method()

    def _phase(self, name: str) -> None:
        for callback in self.callbacks:
            callback.phase(name)

    def _returns_tuple(self, layer: nn.Module, input_ids: torch.Tensor) -> bool:
        """Whether decoder layers return a tuple (Falcon) or the hidden states (most), from one call of layer 0."""
        source = self.source
        hidden, args, kwargs = first_call(source.model, source.layers_path, len(source), input_ids[:, :2])
        with torch.no_grad():
            return isinstance(layer(_to(hidden, source.device), *_to(args, source.device),
                                    **_to(kwargs, source.device)), tuple)

    def _visit(self, step: LayerStep, has_data: bool) -> None:
        for callback in self.callbacks:
            callback.before_layer(step)
        if has_data and not step.skip_run:
            step.outputs = step.rerun()
            step.next_stream = step.outputs
        for callback in self.callbacks:
            callback.after_layer(step)

    def _tail(self, batches: list[torch.Tensor], final: list[torch.Tensor], as_tuple: bool) -> None:
        source = self.source
        tails = [c for c in self.callbacks if c.needs_tail]
        for input_ids, hidden in zip(batches, final):
            kwargs = {}
            for callback in tails:
                kwargs.update(callback.tail_kwargs(input_ids) if callback.tail_kwargs else {})
            with torch.no_grad():
                output = tail_forward(source.model, source.layers_path, len(source), input_ids, hidden, as_tuple,
                                      **kwargs)
            for callback in tails:
                callback.tail(source.model, output, input_ids)
