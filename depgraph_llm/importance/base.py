"""The estimator registry and the code that turns per-element scores into per-unit group scores."""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from depgraph_llm.errors import UserError
from depgraph_llm.graph.groups import Group, Slice
from depgraph_llm.layers.pipeline import LayerCallback
from .chunked import param_unit_scores

log = logging.getLogger(__name__)


class Estimator:
    """Base class: subclasses set `name`, `needs_gradients`, `signed` and implement `element_scores`."""

    name: str = ""
    needs_gradients: bool = False
    signed: bool = False  # True: sum signed scores over a unit, then take |.| (vector-wise Taylor)
    # True when a unit's score estimates the loss increase of removing it, so scores of different group kinds
    # (MLP channels vs heads) can be compared directly; magnitudes and random scores cannot.
    loss_scaled: bool = False
    # True: only the slices where a unit enters a linear layer (its input columns) are scored, as in methods
    # that score what a unit contributes downstream (Wanda-sp, FLAP, OBS, Fisher of a mask)
    consumer_only: bool = False
    needs_calibration: bool = False  # data needed even without gradients (activation statistics)
    row_wise: bool = True  # element scores of a block of rows are those rows of the whole tensor's (chunked.py)
    summary: str = ""
    cost: str = ""

    def prepare(self, model: nn.Module, batches: list[torch.Tensor], show_progress: bool) -> dict[str, object]:
        """Per-parameter extra data (e.g. activation statistics) handed to `element_scores`; default none."""
        return {}

    def element_scores(self, weight: torch.Tensor, grad: torch.Tensor | None, extra=None) -> torch.Tensor:
        raise NotImplementedError

    def unit_scores(self, model: nn.Module, groups: list[Group], batches: list[torch.Tensor],
                    show_progress: bool) -> dict[str, torch.Tensor] | None:
        """Override to score units directly (e.g. per-sample statistics); None = use element scores."""
        return None

    def statistics(self):
        """The layer-pipeline callback that gathers this estimator's calibration statistics (None: no data)."""
        return None

    def extra_from(self, statistics) -> dict[str, object]:
        """The per-parameter extra data from that callback once it has seen a layer (or the whole model)."""
        return {}


ESTIMATORS: dict[str, type[Estimator]] = {}


def register_estimator(cls: type[Estimator]) -> type[Estimator]:
    """Class decorator: make an estimator available under `cls.name`."""
    ESTIMATORS[cls.name] = cls
    return cls


def get_estimator(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise UserError(f"unknown importance estimator {name!r}; choose one of: {', '.join(sorted(ESTIMATORS))}")
    return ESTIMATORS[name]()


def progress_bar(description: str, show: bool):
    """A layer-pipeline progress factory (tqdm over layers), or None when progress is off."""
    if not show:
        return None
    return lambda items, total: tqdm(items, total=total, desc=description, disable=False, leave=False, unit="layer")


def accumulate_gradients(model: nn.Module, batches: Iterable[torch.Tensor], show_progress: bool = True) -> None:
    """Sum the language-modelling loss gradient over calibration batches into each parameter's .grad."""
    model.zero_grad(set_to_none=True)
    batches = list(batches)
    for input_ids in tqdm(batches, desc="gradients", disable=not show_progress, leave=False):
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        (loss / len(batches)).backward()


def score_groups(model: nn.Module, groups: list[Group], estimator: Estimator,
                 batches: Callable[[], Iterable[torch.Tensor]] | None = None,
                 show_progress: bool = True) -> dict[str, torch.Tensor]:
    """Score every unit of every group: {group name: (size,) tensor, or (outer, size) for nested groups}."""
    params = dict(model.named_parameters())
    if (estimator.needs_gradients or estimator.needs_calibration) and batches is None:
        raise UserError(f"importance {estimator.name!r} needs calibration text; pass --calibration FILE")
    direct = estimator.unit_scores(model, groups, list(batches()), show_progress) if batches is not None else None
    if direct is not None:
        return direct
    extra = estimator.prepare(model, list(batches()), show_progress) if estimator.needs_calibration else {}
    if estimator.needs_gradients:
        accumulate_gradients(model, batches(), show_progress)
    by_param = slices_by_param(model, groups, estimator.consumer_only)
    totals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, uses in by_param.items():  # one block of one parameter's element scores in memory at a time
            param = params[name]
            for group_name, unit in param_unit_scores(estimator.element_scores, param, param.grad, extra.get(name),
                                                      uses, estimator.row_wise):
                totals[group_name] = unit if group_name not in totals else totals[group_name] + unit
    scores = {name: total.abs() if estimator.signed else total for name, total in totals.items()}
    if estimator.needs_gradients:
        model.zero_grad(set_to_none=True)
    return scores


class ElementScores(LayerCallback):
    """Scores each parameter while its layer is loaded (after the statistics callback has seen the layer), and
    the parameters outside the layers at the end; `totals()` sums them per group in `slices_by_param` order, so
    the result is bit-identical to `score_groups` on the whole model."""

    def __init__(self, model: nn.Module, groups: list[Group], estimator: Estimator, statistics=None) -> None:
        self.model, self.estimator, self.statistics = model, estimator, statistics
        self.by_param = slices_by_param(model, groups, estimator.consumer_only)
        self.units: dict[str, list[tuple[str, torch.Tensor]]] = {}
        self.layers_path = ""

    def start(self, model: nn.Module, layers_path: str) -> None:
        self.layers_path = layers_path

    def _score(self, name: str, param: torch.Tensor) -> None:
        extra = self.estimator.extra_from(self.statistics) if self.statistics is not None else {}
        self.units[name] = param_unit_scores(self.estimator.element_scores, param, None, extra.get(name),
                                             self.by_param[name], self.estimator.row_wise)

    def after_layer(self, step) -> None:
        for local, param in step.layer.named_parameters():
            name = f"{step.name}.{local}"
            if name in self.by_param:
                self._score(name, param)

    def finish(self) -> None:
        for name, param in self.model.named_parameters():
            if name in self.by_param and not name.startswith(f"{self.layers_path}."):
                self._score(name, param)

    def totals(self) -> dict[str, torch.Tensor]:
        totals: dict[str, torch.Tensor] = {}
        for name in self.by_param:
            for group_name, unit in self.units.get(name, []):
                totals[group_name] = unit if group_name not in totals else totals[group_name] + unit
        return {name: t.abs() if self.estimator.signed else t for name, t in totals.items()}


def score_groups_streaming(source, groups: list[Group], estimator: Estimator, batches: list[torch.Tensor],
                           show_progress: bool = False) -> dict[str, torch.Tensor]:
    """`score_groups` for a model whose decoder layers are visited one at a time (a layer-pipeline source)."""
    from depgraph_llm.layers import LayerPipeline

    needs_data = estimator.needs_gradients or estimator.needs_calibration
    if needs_data and not batches:
        raise UserError(f"importance {estimator.name!r} needs calibration text; pass --calibration FILE")
    if estimator.needs_gradients or type(estimator).unit_scores is not Estimator.unit_scores:
        from .gradients import layerwise_gradient_scores

        return layerwise_gradient_scores(source, groups, estimator, batches)
    statistics = estimator.statistics() if estimator.needs_calibration else None
    scores = ElementScores(source.model, groups, estimator, statistics)
    callbacks = [statistics, scores] if statistics is not None else [scores]
    LayerPipeline(source, callbacks, progress=progress_bar(f"importance ({estimator.name})", show_progress)).run(
        batches if statistics is not None else [])
    return scores.totals()


def consumer_slices(model: nn.Module) -> set[tuple[str, int]]:
    """(weight name, 1) of every linear layer: where a unit enters a layer as input columns."""
    return {(f"{name}.weight", 1) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def slices_by_param(model: nn.Module, groups: list[Group], consumer_only: bool) -> dict[str, list[tuple[str, Slice]]]:
    """Parameter name -> [(group name, slice)] to score; with `consumer_only`, a group's input-column slices
    (all its slices when it has none, e.g. vocabulary rows)."""
    consumers = consumer_slices(model) if consumer_only else set()
    by_param: dict[str, list[tuple[str, Slice]]] = defaultdict(list)
    for group in groups:
        for g in (group, group.nested):
            if g is None:
                continue
            chosen = [s for s in g.slices if (s.param, s.axis) in consumers] if consumer_only else []
            for s in chosen or g.slices:
                by_param[s.param].append((g.name, s))
    return by_param
