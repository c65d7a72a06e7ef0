"""Reconstruction-aware fitness for `--schedule search` (`--search-fitness refit`): every candidate is scored with
the projections that read its removed units (down_proj, o_proj) refitted by the same anchored least squares the
reconstruction uses (EvoPress's database of reconstructed levels, filled lazily as the search visits levels).
The masked fitness ranks profiles as they are before reconstruction; it cannot see that the refit replaces the
removed units of one layer well and of another badly.

The refit here is local (each projection's inputs come from the dense model, on the calibration windows the
importance scores saw), one projection at a time. The final reconstruction runs sequentially on the pruned stream
and may re-choose units by OBS, so this is the closest layer-separable proxy for it, not the same weights."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from depgraph_llm.layers.callbacks import Recorder
from depgraph_llm.layers.pipeline import LayerCallback, LayerPipeline, LayerStep
from depgraph_llm.layers.source import InMemorySource
from depgraph_llm.planning.fitness import INPUT_AXIS, ProfileScorer
from depgraph_llm.recovery.solvers import anchored_least_squares, kept_block, ridge

CACHE_BYTES = 512 << 20  # refitted weights kept for levels the search may visit again


@dataclass(frozen=True)
class RefitSettings:
    """What the fitness refits with: the calibration windows, the anchor and damping of `--reconstruct`."""

    calibration: list[torch.Tensor]
    anchor: float
    damp: float = 0.01


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight in (out, in) layout (transformers' Conv1D stores (in, out))."""
    weight = module.weight.detach()
    return weight.T if INPUT_AXIS.get(type(module).__name__) == 0 else weight


class ConsumerGrams(LayerCallback):
    """Layer-pipeline stage: X^T X of the named modules' inputs on the dense stream (float32 per batch, summed in
    float64), and X^T X W^T, the right-hand side of their least-squares refit."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.grams: dict[str, torch.Tensor] = {}
        self.cross: dict[str, torch.Tensor] = {}
        self._recorder = Recorder()

    def before_layer(self, step: LayerStep) -> None:
        for name, module in step.layer.named_modules():
            full = f"{step.name}.{name}"
            if full in self.names:
                self._recorder.inputs(module, lambda x, full=full: self._add(full, x))

    def _add(self, name: str, x: torch.Tensor) -> None:
        x = x.float()
        product = (x.T @ x).double().cpu()
        self.grams[name] = product if name not in self.grams else self.grams[name].add_(product)

    def after_layer(self, step: LayerStep) -> None:
        self._recorder.close()
        for name, module in step.layer.named_modules():
            full = f"{step.name}.{name}"
            if full in self.grams and full not in self.cross:
                self.cross[full] = self.grams[full] @ linear_weight(module).double().cpu().T


def consumer_grams(model: nn.Module, layers_path: str, names: set[str], calibration: list[torch.Tensor],
                   progress: Callable[[Iterable, int], Iterable] | None = None) -> ConsumerGrams:
    """One pass of the layer pipeline over the calibration windows, gathering ConsumerGrams of `names`."""
    stage = ConsumerGrams(names)
    LayerPipeline(InMemorySource(model, layers_path), [stage], progress=progress).run(calibration)
    return stage


class RefitProfileScorer(ProfileScorer):
    """ProfileScorer whose candidates have every masked projection refitted on its kept inputs."""

    def __init__(self, model: nn.Module, coupling, layers, levels, scores, windows, refit: RefitSettings,
                 progress: Callable[[Iterable, int], Iterable] | None = None):
        super().__init__(model, coupling, layers, levels, scores, windows)
        names = {m for found in self.consumers.values() for m, _ in found}
        self.modules = {name: model.get_submodule(name) for name in sorted(names)}
        self.original = {name: module.weight.data for name, module in self.modules.items()}
        self.refit = refit
        statistics = consumer_grams(model, coupling.layers_path, names, refit.calibration, progress)
        self.grams, self.cross = statistics.grams, statistics.cross
        self._cache: OrderedDict[tuple[str, bytes], torch.Tensor] = OrderedDict()
        self._cached_bytes = 0
        self.solves = 0

    def refitted(self, name: str, mask: torch.Tensor) -> torch.Tensor:
        """The module's weight with only the `mask` inputs, refitted to the dense outputs (zeros elsewhere)."""
        key = (name, mask.numpy().tobytes())
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        module, gram = self.modules[name], self.grams[name]
        kept = mask.nonzero().flatten()
        weight = linear_weight(module).double().cpu()
        new = anchored_least_squares(kept_block(gram, kept), self.cross[name][kept], weight[:, kept],
                                     ridge(gram, self.refit.damp), self.refit.anchor)
        full = torch.zeros_like(weight)
        full[:, kept] = new
        if INPUT_AXIS.get(type(module).__name__) == 0:
            full = full.T
        result = full.to(self.original[name].dtype).contiguous()
        self.solves += 1
        self._cache[key] = result
        self._cached_bytes += result.numel() * result.element_size()
        while self._cached_bytes > CACHE_BYTES and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._cached_bytes -= dropped.numel() * dropped.element_size()
        return result

    def set_profile(self, profile) -> None:
        super().set_profile(profile)
        for name, module in self.modules.items():
            mask = self.masks.get(name)
            module.weight.data = self.original[name] if mask is None else self.refitted(name, mask.cpu())

    def close(self) -> None:
        for name, module in self.modules.items():
            module.weight.data = self.original[name]
        self._cache.clear()
        super().close()
