"""Structured OBS saliency (SlimGPT): the output error of removing an input column j of a linear layer and
optimally updating the others is ||W_:,j||^2 / [H^-1]_jj, with H = X^T X (+ ridge) the layer Hessian.

Computed layer by layer through the sequential pipeline: only the current decoder layer's Hessians (one per
linear layer, in x in float64) are in memory at a time. Units sum the saliencies of their columns (the
diagonal approximation of the block saliency for multi-column units such as heads).
Cost: one forward pass through every layer, one in x in matrix inverse per linear layer."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from depgraph_llm.recovery.layerwise import Recorder, capture_layer_inputs, run_layer
from depgraph_llm.recovery.solvers import ridge
from depgraph_llm.graph.coupling import find_layers_path
from .base import Estimator, register_estimator


@torch.no_grad()
def inverse_hessian_diagonals(model: nn.Module, batches: list[torch.Tensor], damp: float = 0.01,
                              show_progress: bool = False) -> dict[str, torch.Tensor]:
    """{weight name: diag((X^T X + ridge)^-1)} for every linear layer inside the decoder layers."""
    path = find_layers_path(model)
    layers = model.get_submodule(path)
    inputs = capture_layer_inputs(model, layers, batches)
    stream, result = inputs.hidden, {}
    for index, layer in enumerate(tqdm(layers, desc="OBS Hessians", disable=not show_progress, leave=False)):
        grams: dict[str, torch.Tensor] = {}
        recorder = Recorder()
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                key = f"{path}.{index}.{name}.weight"
                recorder.inputs(module, lambda x, key=key: grams.__setitem__(
                    key, grams.get(key, 0) + x.double().T @ x.double()))
        try:
            stream = run_layer(layer, stream, inputs.arguments[index])
        finally:
            recorder.close()
        for key, gram in grams.items():
            eye = torch.eye(len(gram), dtype=gram.dtype)
            result[key] = torch.linalg.inv(gram + ridge(gram, damp) * eye).diagonal().clone()
    return result


@register_estimator
class OBS(Estimator):
    name = "obs"
    needs_calibration = True
    consumer_only = True
    summary = "SlimGPT structured OBS saliency ||W_:,j||^2 / [H^-1]_jj from the layer Hessian X^T X"
    cost = "one layer-by-layer forward pass; one Hessian inverse per linear layer, one layer at a time"

    def prepare(self, model, batches, show_progress):
        return inverse_hessian_diagonals(model, batches, show_progress=show_progress)

    def element_scores(self, weight, grad, extra=None):
        if extra is None or weight.dim() != 2:
            return torch.zeros_like(weight)
        return weight.pow(2) / extra.to(weight.dtype)[None, :]
