"""The estimator registry and the code that turns per-element scores into per-unit group scores."""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError
from ..groups import Group, Slice

log = logging.getLogger(__name__)


class Estimator:
    """Base class: subclasses set `name`, `needs_gradients`, `signed` and implement `element_scores`."""

    name: str = ""
    needs_gradients: bool = False
    signed: bool = False  # True: sum signed scores over a unit, then take |.| (vector-wise Taylor)
    # True when a unit's score estimates the loss increase of removing it, so scores of different group kinds
    # (MLP channels vs heads) can be compared directly; magnitudes and random scores cannot.
    loss_scaled: bool = False
    summary: str = ""

    def element_scores(self, weight: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


ESTIMATORS: dict[str, type[Estimator]] = {}


def register_estimator(cls: type[Estimator]) -> type[Estimator]:
    """Class decorator: make an estimator available under `cls.name`."""
    ESTIMATORS[cls.name] = cls
    return cls


def get_estimator(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise UserError(f"unknown importance estimator {name!r}; choose one of: {', '.join(sorted(ESTIMATORS))}")
    return ESTIMATORS[name]()


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
    if estimator.needs_gradients:
        if batches is None:
            raise UserError(f"importance {estimator.name!r} needs calibration text; pass --calibration FILE")
        accumulate_gradients(model, batches(), show_progress)
    by_param: dict[str, list[tuple[str, Slice]]] = defaultdict(list)
    for group in groups:
        for g in (group, group.nested):
            if g is not None:
                for s in g.slices:
                    by_param[s.param].append((g.name, s))
    totals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, uses in by_param.items():  # one parameter's element scores in memory at a time
            param = params[name]
            element = estimator.element_scores(param.detach().float(), _grad(param))
            for group_name, s in uses:
                unit = s.unit_scores(element).double()
                totals[group_name] = unit if group_name not in totals else totals[group_name] + unit
            del element
    scores = {name: total.abs() if estimator.signed else total for name, total in totals.items()}
    if estimator.needs_gradients:
        model.zero_grad(set_to_none=True)
    return scores


def _grad(param: torch.Tensor) -> torch.Tensor | None:
    return None if param.grad is None else param.grad.detach().float()
