"""Callbacks that gather calibration statistics layer by layer: linear-layer input statistics (Wanda-sp, FLAP),
inverse Hessian diagonals (OBS), and the hidden states at layer boundaries (Block Influence, angular distance)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .pipeline import LayerCallback, LayerStep


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


def add_input_moments(stats: dict[str, dict], name: str, x: torch.Tensor) -> None:
    """Accumulate sum, sum of squares (float64) and token count of a linear layer's inputs into stats[name]."""
    x = x.double()
    entry = stats.setdefault(name, {"sum": 0, "sumsq": 0, "tokens": 0})
    entry["sum"] = entry["sum"] + x.sum(0)
    entry["sumsq"] = entry["sumsq"] + (x * x).sum(0)
    entry["tokens"] += len(x)


class InputStatistics(LayerCallback):
    """{weight name: {"sum", "sumsq", "tokens"}} of every nn.Linear's input, inside and outside the layers."""

    needs_tail = True

    def __init__(self) -> None:
        self.stats: dict[str, dict] = {}
        self._layer = Recorder()
        self._outside = Recorder()
        self._phase = ""
        self._before_layers: set[str] = set()

    def start(self, model: nn.Module, layers_path: str) -> None:
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and not name.startswith(f"{layers_path}."):
                self._outside.inputs(module, lambda x, key=f"{name}.weight": self._outside_input(key, x))

    def phase(self, name: str) -> None:
        self._phase = name

    def _outside_input(self, key: str, x: torch.Tensor) -> None:
        """Modules before the layers run in the capture forward, those after them in the tail forward."""
        if self._phase == "capture":
            self._before_layers.add(key)
        elif self._phase != "tail" or key in self._before_layers:
            return
        add_input_moments(self.stats, key, x)

    def before_layer(self, step: LayerStep) -> None:
        for name, module in step.layer.named_modules():
            if isinstance(module, nn.Linear):
                self._layer.inputs(module, lambda x, key=f"{step.name}.{name}.weight": add_input_moments(
                    self.stats, key, x))

    def after_layer(self, step: LayerStep) -> None:
        self._layer.close()

    def finish(self) -> None:
        self._outside.close()


class HessianDiagonals(LayerCallback):
    """{weight name: diag((X^T X + ridge)^-1)} for every linear layer inside the decoder layers (OBS)."""

    def __init__(self, damp: float = 0.01) -> None:
        self.damp = damp
        self.result: dict[str, torch.Tensor] = {}
        self._grams: dict[str, torch.Tensor] = {}
        self._recorder = Recorder()

    def before_layer(self, step: LayerStep) -> None:
        self._grams = {}
        for name, module in step.layer.named_modules():
            if isinstance(module, nn.Linear):
                key = f"{step.name}.{name}.weight"
                self._recorder.inputs(module, lambda x, key=key: self._grams.__setitem__(
                    key, self._grams.get(key, 0) + x.double().T @ x.double()))

    def after_layer(self, step: LayerStep) -> None:
        from depgraph_llm.recovery.solvers import damped_inverse

        self._recorder.close()
        for key, gram in self._grams.items():
            self.result[key] = damped_inverse(gram.cpu(), self.damp).diagonal().clone()
        self._grams = {}


class BoundaryStates(LayerCallback):
    """Hidden states (float32, on the CPU) at every layer boundary, per batch: [batch][boundary]."""

    def __init__(self) -> None:
        self.states: list[list[torch.Tensor]] = []

    def after_layer(self, step: LayerStep) -> None:
        if step.index == 0:
            self.states = [[hidden.detach().float().cpu()] for hidden in step.stream]
        for per_batch, out in zip(self.states, step.outputs):
            per_batch.append(out.detach().float().cpu())
