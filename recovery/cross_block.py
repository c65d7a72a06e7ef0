"""Error that does not stay local: block-output error on calibration and held-out windows, and the cross-block
refit (`--cross-block W`).

The closed-form reconstruction (reconstruct.py) fits each consumer to the dense weights applied to its own inputs.
This stage, the last of the reconstruction pass, keeps the DENSE model's stream beside the pruned one and measures,
after every layer, the relative error of the block outputs per token, ||pruned_t - dense_t||^2 / ||dense_t||^2
averaged over tokens (pruned model on its own stream against the dense model on the dense stream), on the calibration windows and on held-out
windows that no stage fits on: a refit that only lowers the first overfits the calibration text.

With a window W >= 1 the pruned blocks are, after their closed-form step, tuned W at a time (Adam, fp32, a few
epochs over the calibration windows, optionally regularised toward the closed-form weights) so that the window's
output on the pruned stream matches the dense model's output of the same W blocks on the dense stream (the
"Rethinking" paper's cross-block reconstruction). Columns the plan removes stay exactly zero (their gradients and
values are masked), so the result slices to the same widths; blocks of a window that the sink has already sliced
are tuned at their physical widths. Layers the plan removes are the identity in the pruned chain.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from depgraph_llm.errors import UserError
from depgraph_llm.graph.coupling import CouplingGraph
from depgraph_llm.layers import LayerCallback, LayerStep
from depgraph_llm.layers.pipeline import _to, run_layer
from depgraph_llm.layers.source import capture_inputs, first_call
from depgraph_llm.planning.plan import PrunePlan, axis_masks
from .reconstruct import input_axis


@dataclass(frozen=True)
class CrossBlockSettings:
    """Cross-block refit settings; window 0 measures the block-output errors only."""

    window: int = 0      # consecutive decoder layers tuned together (0: no refit)
    epochs: int = 2      # passes over the calibration windows per window of layers
    lr: float = 1e-5     # Adam learning rate
    reg: float = 0.0     # weight of ||theta - theta_closed_form||^2 / ||theta_closed_form||^2 in the loss

    def validate(self) -> None:
        if self.window < 0:
            raise UserError(f"--cross-block {self.window} must be 0 (off) or a number of consecutive layers, e.g. 2")
        if self.epochs < 1:
            raise UserError(f"--cross-block-epochs {self.epochs} must be a positive number of passes")
        if not self.lr > 0:
            raise UserError(f"--cross-block-lr {self.lr} must be positive, e.g. 1e-5")
        if self.reg < 0:
            raise UserError(f"--cross-block-reg {self.reg} must be 0 or positive")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def token_relative_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ||out_t - target_t||^2 / ||target_t||^2. Per token, because a model's residual stream can
    hold a few massive activations (SmolLM2-135M: from layer 12 on, the first token's dimension 507 carries ~98% of
    the stream's energy): a ratio of sums then measures that one entry and a refit on it tunes nothing else."""
    per_token = (out - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-30)
    return per_token.mean()


def relative_error(pruned: list[torch.Tensor], dense: list[torch.Tensor]) -> float:
    """token_relative_loss over a stream of batches: the mean over all their tokens (float64)."""
    total, tokens = 0.0, 0
    for p, d in zip(pruned, dense, strict=True):
        per_token = token_relative_loss(p.double(), d.double())
        total += float(per_token) * d[..., 0].numel()
        tokens += d[..., 0].numel()
    return total / tokens if tokens else 0.0


def disjoint_windows(heldout: list[torch.Tensor], calibration: list[torch.Tensor]) -> list[torch.Tensor]:
    """The held-out windows that are not also calibration windows (same tokens), so that no held-out error is
    measured on text a stage fitted on."""
    return [w for w in heldout if not any(w.shape == c.shape and torch.equal(w, c) for c in calibration)]


def _summary(per_layer: list[float | None]) -> dict:
    measured = [e for e in per_layer if e is not None]
    return {"per_layer": [None if e is None else round(e, 8) for e in per_layer],
            "mean": round(sum(measured) / len(measured), 8) if measured else None,
            "last": round(measured[-1], 8) if measured else None}


@dataclass
class BlockErrorReport:
    """Per-layer block-output errors and what the refit did, merged into the plan's reconstruct_report."""

    settings: CrossBlockSettings
    calibration: list[float | None] = field(default_factory=list)
    heldout: list[float | None] = field(default_factory=list)
    heldout_windows: int = 0
    refit_windows: int = 0
    refit_loss_before: list[float] = field(default_factory=list)  # per window, mean relative loss, first epoch
    refit_loss_after: list[float] = field(default_factory=list)   # per window, after the last epoch

    def to_dict(self) -> dict:
        record = {"error_measure": "per token ||pruned - dense||^2 / ||dense||^2, mean over tokens",
                  "error_calibration": _summary(self.calibration),
                  "error_heldout": {**_summary(self.heldout), "windows": self.heldout_windows}}
        if self.settings.window:
            record["cross_block"] = {**self.settings.to_dict(), "windows_tuned": self.refit_windows,
                                     "loss_before": [round(v, 8) for v in self.refit_loss_before],
                                     "loss_after": [round(v, 8) for v in self.refit_loss_after]}
        return record


@dataclass
class _Block:
    """One layer of the current window: its module, arguments and dense outputs (calibration, held-out)."""

    index: int
    name: str
    layer: nn.Module
    arguments: list[tuple[tuple, dict]]
    held_arguments: list[tuple[tuple, dict]]
    removed: bool
    dense_cal: list[torch.Tensor]
    dense_held: list[torch.Tensor]


class _Dense:
    """A layer's forward with the weights it had before any stage changed it (a snapshot, via functional_call)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.state = {n: t.detach().clone() for n, t in [*layer.named_parameters(), *layer.named_buffers()]}

    def __call__(self, hidden, *args, **kwargs):
        return functional_call(self.layer, self.state, (hidden, *args), kwargs)


class CrossBlock(LayerCallback):
    """The last stage of the reconstruction pass: dense and pruned streams side by side (calibration and held-out),
    block-output errors per layer, and with settings.window >= 1 the cross-block refit."""

    def __init__(self, coupling: CouplingGraph, plan: PrunePlan, settings: CrossBlockSettings,
                 heldout: list[torch.Tensor] | None = None, pipeline_is_pruned: bool = True) -> None:
        self.coupling, self.plan, self.settings = coupling, plan, settings
        self.heldout = list(heldout or [])
        self.pipeline_is_pruned = pipeline_is_pruned  # the pipeline's stream is the pruned one (sequential)
        self.removed = set(plan.removed_layers)
        self.report = BlockErrorReport(settings, heldout_windows=len(self.heldout))
        self._count = 0
        self._held_args: list[list[tuple[tuple, dict]]] = []
        self._dense_cal: list[torch.Tensor] = []
        self._dense_held: list[torch.Tensor] = []
        self._pruned_cal: list[torch.Tensor] = []   # entering the current window
        self._pruned_held: list[torch.Tensor] = []
        self._window: list[_Block] = []
        self._dense: _Dense | None = None

    def start(self, model: nn.Module, layers_path: str) -> None:
        layers = model.get_submodule(layers_path)
        self._count = len(layers)
        self.report.calibration = [None] * self._count
        self.report.heldout = [None] * self._count
        if not self.heldout:
            return
        hidden, args, kwargs = first_call(model, layers_path, self._count, self.heldout[0][:, :2])
        device = next(layers[0].parameters()).device
        as_tuple = isinstance(layers[0](hidden.to(device), *args, **kwargs), tuple)
        inputs = capture_inputs(model, layers_path, self._count, self.heldout, as_tuple)
        self._dense_held, self._pruned_held, self._held_args = inputs.hidden, list(inputs.hidden), inputs.arguments

    def before_layer(self, step: LayerStep) -> None:
        if step.index == 0:
            self._dense_cal, self._pruned_cal = list(step.stream), list(step.stream)
        self._dense = _Dense(step.layer)  # before any stage's after_layer changes the weights

    def after_layer(self, step: LayerStep) -> None:
        dense = self._dense
        self._dense = None
        held_args = self._held_args[step.index] if self._held_args else []
        dense_cal = run_layer(dense, self._dense_cal, step.arguments, step.device)
        dense_held = run_layer(dense, self._dense_held, held_args, step.device)
        self._window.append(_Block(step.index, step.name, step.layer, step.arguments, held_args,
                                   step.index in self.removed, dense_cal, dense_held))
        self._dense_cal, self._dense_held = dense_cal, dense_held
        size = max(1, self.settings.window)
        if len(self._window) < size and step.index < self._count - 1:
            return
        if self.settings.window and any(not b.removed for b in self._window):
            self._refit(step.device)
        reuse = (step.next_stream if self.pipeline_is_pruned and not self.settings.window and len(self._window) == 1
                 and not self._window[0].removed else None)
        for block in self._window:
            if not block.removed:
                self._pruned_cal = reuse if reuse is not None else run_layer(block.layer, self._pruned_cal,
                                                                             block.arguments, step.device)
                self._pruned_held = run_layer(block.layer, self._pruned_held, block.held_arguments, step.device)
            self.report.calibration[block.index] = relative_error(self._pruned_cal, block.dense_cal)
            if self.heldout:
                self.report.heldout[block.index] = relative_error(self._pruned_held, block.dense_held)
        if self.settings.window and self.pipeline_is_pruned:
            step.next_stream = self._pruned_cal  # the next layers see the tuned window's outputs
        self._window = []

    def _refit(self, device: torch.device | None) -> None:
        """Adam on every parameter of the window's kept layers: pruned stream in, the dense window output out."""
        blocks = [b for b in self._window if not b.removed]
        params = [p for b in blocks for p in b.layer.parameters() if p.is_floating_point()]
        anchors = [p.detach().clone() for p in params]
        anchor_energy = sum(float(a.pow(2).sum()) for a in anchors) or 1.0
        masks = self._column_masks(blocks)
        flags = [p.requires_grad for p in params]
        optimizer = torch.optim.Adam(params, lr=self.settings.lr)
        targets = self._window[-1].dense_cal
        before = self._window_loss(blocks, targets, device)
        try:
            with torch.enable_grad():
                for p in params:
                    p.requires_grad_(True)
                for _ in range(self.settings.epochs):
                    for b, (hidden, target) in enumerate(zip(self._pruned_cal, targets, strict=True)):
                        out = self._forward(blocks, hidden, b, device)
                        target = target.to(out.device)
                        loss = token_relative_loss(out, target)
                        if self.settings.reg:
                            loss = loss + self.settings.reg * sum(
                                (p - a).pow(2).sum() for p, a in zip(params, anchors)) / anchor_energy
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        for p, keep in masks:
                            if p.grad is not None:
                                p.grad.mul_(keep)
                        optimizer.step()
                        with torch.no_grad():
                            for p, keep in masks:
                                p.mul_(keep)
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
                p.grad = None
        after = self._window_loss(blocks, targets, device)
        if not after < before:  # the steps overshot (lr too large): keep the closed-form weights
            with torch.no_grad():
                for p, a in zip(params, anchors):
                    p.copy_(a)
            after = before
        self.report.refit_windows += 1
        self.report.refit_loss_before.append(before)
        self.report.refit_loss_after.append(after)

    def _forward(self, blocks: list[_Block], hidden: torch.Tensor, batch: int, device) -> torch.Tensor:
        """The window's pruned chain on one batch (removed layers are the identity)."""
        x = _to(hidden, device)
        for block in blocks:
            args, kwargs = block.arguments[batch]
            args, kwargs = _to(args, device), _to(kwargs, device)
            out = block.layer(x, *args, **kwargs)
            x = out[0] if isinstance(out, tuple) else out
        return x

    @torch.no_grad()
    def _window_loss(self, blocks: list[_Block], targets: list[torch.Tensor], device) -> float:
        losses = []
        for b, (hidden, target) in enumerate(zip(self._pruned_cal, targets)):
            out = self._forward(blocks, hidden, b, device)
            target = target.to(out.device)
            losses.append(float(token_relative_loss(out, target)))
        return sum(losses) / max(1, len(losses))

    def _column_masks(self, blocks: list[_Block]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(weight, keep mask broadcast to its shape) for every consumer weight of the window still at its dense
        width with removed input columns (blocks the sink has sliced have none left)."""
        masks = axis_masks(self.coupling, self.plan)  # read now: OBS may have changed the plan's choice
        found = []
        for block in blocks:
            for module_name, module in block.layer.named_modules():
                axis = input_axis(module)
                keep = masks.get((f"{block.name}.{module_name}.weight" if module_name else f"{block.name}.weight",
                                  axis)) if axis is not None else None
                weight = getattr(module, "weight", None)
                if keep is None or bool(keep.all()) or weight.shape[axis] != len(keep):
                    continue
                shape = [1, 1]
                shape[axis] = len(keep)
                found.append((weight, keep.to(weight.device, weight.dtype).reshape(shape)))
        return found

    def finish(self) -> None:
        self._dense_cal = self._dense_held = self._pruned_cal = self._pruned_held = []
        self._held_args = []


def prepare_cross_block(coupling: CouplingGraph, plan: PrunePlan, settings: CrossBlockSettings,
                        calibration: list[torch.Tensor], heldout: list[torch.Tensor] | None,
                        mode: str) -> CrossBlock:
    """The stage, after the checks: a refit needs the pruned stream (sequential mode) and a reconstruction."""
    settings.validate()
    if settings.window and mode != "sequential":
        raise UserError(f"--cross-block tunes blocks on the pruned model's stream; use --reconstruct-mode "
                        f"sequential (not {mode})")
    return CrossBlock(coupling, plan, settings, disjoint_windows(list(heldout or []), calibration),
                      pipeline_is_pruned=mode == "sequential")
