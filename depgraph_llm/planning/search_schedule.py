"""`--schedule search` end to end: level database, uniform start, evolution scored on held-aside windows, and the
chosen profile as kept units for the normal path (reconstruction, slicing, saving)."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from depgraph_llm.errors import UserError
from depgraph_llm.graph.coupling import CouplingGraph
from depgraph_llm.planning.budget import Allocation, ParamCounter, Widths
from depgraph_llm.planning.fitness import ProfileScorer
from depgraph_llm.planning.refit_fitness import RefitProfileScorer, RefitSettings
from depgraph_llm.planning.search import SearchSettings, evolve, params_of
from depgraph_llm.planning.search_levels import (budget_band, level_database, profile_keep, profile_record,
                                                 searched_layers, uniform_profile)

log = logging.getLogger(__name__)


@dataclass
class SearchedPlan:
    """What the search hands to the normal path, and its record for prune_plan.json."""

    keep: dict[str, list[int]]
    keep_nested: dict[str, list[list[int]]]
    removed_layers: list[int]
    params_after: int
    record: dict


@dataclass(frozen=True)
class SearchInputs:
    """The uniform plan the search starts from, and the budget it is held to."""

    keep: dict[str, list[int]]
    keep_nested: dict[str, list[list[int]]]
    params_after: int
    reference: int
    ratio: float
    round_to: int


def plan_search(model: nn.Module, coupling: CouplingGraph, counter: ParamCounter, scores: dict[str, torch.Tensor],
                start: SearchInputs, held_out: list[torch.Tensor], allocation: Allocation,
                is_valid: Callable[[Widths], bool], settings: SearchSettings, seed: int,
                progress: Callable[[Iterable, int], Iterable] | None = None, refit: RefitSettings | None = None,
                refit_progress: Callable[[Iterable, int], Iterable] | None = None) -> SearchedPlan:
    """Search per-layer MLP widths, attention levels and dropped layers at the uniform plan's budget; with
    `refit`, candidates are scored after a least-squares refit of the projections they mask."""
    if held_out is None:
        raise UserError("--schedule search scores candidates on the model in memory; drop --streaming / --device")
    if allocation.layers_removed is not None or allocation.hidden_ratio is not None:
        raise UserError("--schedule search chooses dropped layers and widths itself and does not search the hidden "
                        "width yet; drop --layers-removed / --hidden-ratio, or use --schedule uniform")
    layers = searched_layers(coupling)
    searched = {g.name for lg in layers for g in (lg.mlp, lg.heads) if g is not None}
    fixed = {k: len(v) for k, v in start.keep.items() if k not in searched}  # vocabulary kept, if any
    levels = level_database(layers, counter, start.round_to, allocation, is_valid)
    profile = uniform_profile(layers, levels, start.keep, start.keep_nested)
    full = counter.count(fixed)
    steps = [s for lv in levels for s in (a - b for a, b in zip(lv.mlp_saving, lv.mlp_saving[1:]))]
    budget = budget_band(full, start.reference, start.ratio, start.params_after, max(steps, default=1))
    if params_of(profile, levels, full) != start.params_after:
        raise RuntimeError("internal error: the level database does not add up to the uniform plan's count")
    scorer = (ProfileScorer(model, coupling, layers, levels, scores, held_out) if refit is None else
              RefitProfileScorer(model, coupling, layers, levels, scores, held_out, refit, refit_progress))
    with scorer:
        result = evolve(profile, levels, budget, scorer, settings, seed, progress)
    keep, keep_nested, removed = profile_keep(layers, levels, result.profile, scores)
    keep.update({k: v for k, v in start.keep.items() if k not in searched})
    params_after = counter.count({**fixed, **{k: len(v) for k, v in keep.items()},
                                  **{k: len(rows[0]) for k, rows in keep_nested.items()}},
                                 removed_layers=frozenset(removed))
    if params_after != params_of(result.profile, levels, full):
        raise RuntimeError("internal error: the searched profile's count differs from the parameter counter's")
    log.info("search: KL %.4g -> %.4g after %d evaluations", result.start_fitness, result.fitness, result.evaluations)
    if result.stopped_by == "time limit":
        log.warning("search: stopped at the %.0f s limit after %d of %d generations (--search-time)",
                    settings.time_limit_s, len(result.history), settings.generations)
    record = {"profile": profile_record(levels, result.profile), "uniform": result.profile.is_uniform(levels),
              "fitness": ("KL(dense || masked) per token on held-aside windows" if refit is None else
                          "KL(dense || masked, masked projections refitted by anchored least squares on the "
                          "calibration windows) per token on held-aside windows"),
              **({} if refit is None else {"refit": {"anchor": refit.anchor, "damp": refit.damp,
                                                      "calibration_windows": len(refit.calibration),
                                                      "solves": scorer.solves}}),
              "start_fitness": result.start_fitness, "best_fitness": result.fitness,
              "history": result.history, "evaluations": result.evaluations,
              "generations_run": len(result.history), "stopped_by": result.stopped_by,
              "held_out_windows": len(held_out), "held_out_tokens": sum(w.numel() for w in held_out),
              "budget": {"low": budget.low, "high": budget.high}, "settings": asdict(settings), "seed": seed}
    return SearchedPlan(keep, keep_nested, removed, params_after, record)


HELD_OUT_SEED = 7919  # added to --seed: the held-aside windows are another draw than the calibration windows


def held_aside_windows(source, model, tokenizer, calibration: list[torch.Tensor], seq_len: int, seed: int,
                       settings: SearchSettings) -> list[torch.Tensor]:
    """Windows of the calibration source that overlap no calibration window, cut to settings.held_out_tokens
    (a generated source samples new text with another seed)."""
    count = settings.held_out_windows
    if source.is_self:
        return source.windows(model, tokenizer, settings.held_out_tokens, count, seed + HELD_OUT_SEED)
    drawn = source.windows(model, tokenizer, seq_len, count + len(calibration), seed + HELD_OUT_SEED)
    fresh = [w for w in drawn if not any(_overlaps(w, c) for c in calibration)]
    if not fresh:
        raise UserError("--schedule search found no calibration text outside the calibration windows to score "
                        "candidates on; pass more calibration text or fewer --calibration-samples")
    if len(fresh) < count:
        log.warning("--schedule search: only %d held-aside windows outside the calibration windows", len(fresh))
    return [w[:, :settings.held_out_tokens] for w in fresh[:count]]


def _overlaps(window: torch.Tensor, calibration_window: torch.Tensor) -> bool:
    """Same tokens at most positions (windows of one source lie on one grid: equal or disjoint, up to an edge)."""
    n = min(window.shape[-1], calibration_window.shape[-1])
    return bool((window[..., :n] == calibration_window[..., :n]).float().mean() > 0.5)
