"""Exact full-model gradient scores (Taylor, Fisher) with one decoder layer in memory at a time.

Forward: each layer's input hidden states are kept (per calibration batch). Backward: the loss gradient at the
last layer's output comes from the model's tail (final norm, head, loss) alone; then the layers are visited in
reverse, each loaded alone, re-run on its stored input with autograd and back-propagated, which gives its
parameter gradients and the gradient at its input; the embeddings come last. Same gradients as one backward
through the whole model (up to float summation order), at the memory of one layer plus the stored inputs."""
from __future__ import annotations

import torch
from torch import nn

from depgraph_llm.graph.groups import Group
from depgraph_llm.layers.pipeline import _to, run_layer
from depgraph_llm.layers.source import _Stop, capture_inputs, first_call, stubbed_layers, model_device, tail_forward

from .base import Estimator, slices_by_param
from .chunked import param_unit_scores


def _layer_call(layer: nn.Module, hidden: torch.Tensor, call: tuple, device) -> torch.Tensor:
    args, kwargs = call
    out = layer(_to(hidden, device), *_to(args, device), **_to(kwargs, device))
    return out[0] if isinstance(out, tuple) else out


def _embedding_backward(model: nn.Module, layers_path: str, count: int, input_ids: torch.Tensor,
                        grad: torch.Tensor) -> None:
    """Back-propagate `grad` (at layer 0's input) into the parameters before the decoder layers."""
    seen = []

    def record(index, states, args, kwargs):
        seen.append(states)
        raise _Stop

    with torch.enable_grad(), stubbed_layers(model, layers_path, count, record, False):
        try:
            model(input_ids=input_ids.to(model_device(model)), use_cache=False)
        except _Stop:
            pass
        if seen and seen[0].requires_grad:
            torch.autograd.backward(seen[0], grad.to(seen[0].device))


class _Contributions:
    """Per-parameter unit-score contributions, summed per group in `slices_by_param` order at the end."""

    def __init__(self, model: nn.Module, groups: list[Group], estimator: Estimator) -> None:
        self.estimator = estimator
        self.by_param = slices_by_param(model, groups, estimator.consumer_only)
        self.units: dict[str, list[tuple[str, torch.Tensor]]] = {}

    def add_element_scores(self, name: str, param: torch.Tensor) -> None:
        """A block of rows at a time for large parameters (the embedding's float32 weight, gradient and scores are
        not all copied whole), with the same bits (chunked.py)."""
        self.units[name] = param_unit_scores(self.estimator.element_scores, param, param.grad, None,
                                             self.by_param[name], self.estimator.row_wise)

    def totals(self) -> dict[str, torch.Tensor]:
        totals: dict[str, torch.Tensor] = {}
        for name in self.by_param:
            for group_name, unit in self.units.get(name, []):
                totals[group_name] = unit if group_name not in totals else totals[group_name] + unit
        return {n: t.abs() if self.estimator.signed else t for n, t in totals.items()}


def _mask_gradients(by_param, named: list[tuple[str, torch.Tensor]], into: dict[str, torch.Tensor]) -> None:
    """Fisher: add the signed unit sums of w * dL/dw of these parameters (one sample's gradients) into `into`."""
    with torch.no_grad():
        for name, param in named:
            if name not in by_param or param.grad is None:
                continue
            product = (param.detach() * param.grad).double()
            for group_name, s in by_param[name]:
                unit = s.unit_scores(product).cpu()
                into[group_name] = unit if group_name not in into else into[group_name] + unit


def layerwise_gradient_scores(source, groups: list[Group], estimator: Estimator,
                              batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Taylor-family element scores (summed gradients over batches, loss / batches) or Fisher mask scores
    (per-batch gradients), from gradients computed one decoder layer at a time."""
    fisher = type(estimator).unit_scores is not Estimator.unit_scores
    model, path, count = source.model, source.layers_path, len(source)
    outside = [(n, p) for n, p in model.named_parameters() if not n.startswith(f"{path}.")]
    for _, p in outside:
        p.requires_grad_(True)
        p.grad = None
    scale = 1.0 if fisher else 1.0 / len(batches)
    contributions = _Contributions(model, groups, estimator)
    masks: list[dict[str, torch.Tensor]] = [{} for _ in batches]
    # forward: every layer's input, one layer at a time
    layer = source.load(0)
    hidden, args, kwargs = first_call(model, path, count, batches[0][:, :2])
    with torch.no_grad():
        as_tuple = isinstance(layer(_to(hidden, source.device), *_to(args, source.device),
                                    **_to(kwargs, source.device)), tuple)
    inputs = capture_inputs(model, path, count, batches, as_tuple)
    stored: list[list[torch.Tensor]] = []
    stream = inputs.hidden
    for index in range(count):
        layer = source.load(index) if index else layer
        stored.append(stream)
        stream = run_layer(layer, stream, inputs.arguments[index], source.device,
                           store=getattr(source, "activations", None))  # stored inputs may live on disk
        source.release(index, layer)
    # the tail: loss gradient at the last layer's output (and the head's own gradients)
    grads = []
    for b, (input_ids, final) in enumerate(zip(batches, stream)):
        final = final.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = tail_forward(model, path, count, input_ids, final, as_tuple, labels=input_ids).loss
            (loss * scale).backward()
        grads.append(final.grad.detach())
        if fisher:
            _mask_gradients(contributions.by_param, outside, masks[b])
            for _, p in outside:
                p.grad = None
    # the layers in reverse, each loaded alone
    for index in reversed(range(count)):
        layer = source.load(index)
        named = [(f"{path}.{index}.{n}", p) for n, p in layer.named_parameters()]
        flags = [p.requires_grad for _, p in named]
        for _, p in named:
            p.requires_grad_(True)
            p.grad = None
        for b, hidden in enumerate(stored[index]):
            hidden = hidden.detach().requires_grad_(True)
            with torch.enable_grad():
                out = _layer_call(layer, hidden, inputs.arguments[index][b], source.device)
                torch.autograd.backward(out, grads[b].to(out.device))
            grads[b] = hidden.grad.detach()
            if fisher:
                _mask_gradients(contributions.by_param, named, masks[b])
                for _, p in named:
                    p.grad = None
        if not fisher:
            for name, p in named:
                if name in contributions.by_param:
                    contributions.add_element_scores(name, p)
        for (_, p), flag in zip(named, flags):
            p.grad = None
            p.requires_grad_(flag)
        stored[index] = []
        source.release(index, layer)
    # the embeddings
    for b, input_ids in enumerate(batches):
        _embedding_backward(model, path, count, input_ids, grads[b])
        if fisher:
            _mask_gradients(contributions.by_param, outside, masks[b])
            for _, p in outside:
                p.grad = None
    if fisher:
        totals: dict[str, torch.Tensor] = {}
        for per_batch in masks:
            for group_name, grad in per_batch.items():
                totals[group_name] = totals.get(group_name, 0) + grad.pow(2) / 2
        scores = totals
    else:
        for name, p in outside:
            if name in contributions.by_param:
                contributions.add_element_scores(name, p)
        scores = contributions.totals()
    for _, p in outside:
        p.grad = None
    return scores
