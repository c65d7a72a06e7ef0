"""Importance of routed experts from what the router does on calibration text (the other groups: `taylor`).

- `expert-frequency`: the fraction of tokens routed to each expert (top-k picks), the simplest usage signal.
- `reap`: REAP (router-weighted expert activation pruning): the mean over the tokens routed to an expert of
  gate value x ||expert output||; an expert the router trusts little, or whose output is small, goes first.
- `expert-reconstruction`: NAEE-style: the MoE output error on calibration tokens when experts are dropped from
  the routing (their router logits set to -inf, top-k renormalised as the model does). Experts are ranked by
  greedy elimination (the next expert removed is the one whose removal, with those already removed, adds the
  least error); `best_removal` enumerates all subsets when they are few.

Cost: one no-grad forward pass over the calibration batches with hooks on every router (the MoE inputs of at
most `MAX_TOKENS` tokens per layer are kept), then per layer one expert call per expert (`reap`) or
O(experts^2) routed-experts calls (`expert-reconstruction`); plus the `taylor` gradients for the other groups.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import nn

from depgraph_llm.graph.groups import Group, GroupKind
from .base import Estimator, get_estimator, register_estimator, score_groups

MAX_TOKENS = 2048
MAX_SUBSETS = 256


def routing_frequency(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Fraction of tokens that route to each expert: (tokens, k) indices -> (experts,)."""
    counts = torch.bincount(top_k_index.reshape(-1), minlength=num_experts).double()
    return counts / max(1, top_k_index.shape[0])


def reap_scores(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, output_norms: torch.Tensor,
                num_experts: int) -> torch.Tensor:
    """REAP: per expert, the mean of gate value x ||expert output|| over the (token, pick) pairs routed to it
    (0 for an expert nobody routes to). All inputs are (tokens, k)."""
    index = top_k_index.reshape(-1)
    weighted = (top_k_weights.double() * output_norms.double()).reshape(-1)
    total = torch.zeros(num_experts, dtype=torch.float64).index_add_(0, index, weighted)
    counts = torch.bincount(index, minlength=num_experts).double()
    return torch.where(counts > 0, total / counts.clamp(min=1), torch.zeros_like(total))


def greedy_removal_order(error: Callable[[frozenset[int]], float], num_experts: int) -> list[int]:
    """Experts in the order greedy elimination removes them (all but one)."""
    removed: list[int] = []
    for _ in range(num_experts - 1):
        left = [e for e in range(num_experts) if e not in removed]
        removed.append(min(left, key=lambda e: (error(frozenset(removed + [e])), e)))
    return removed


def best_removal(error: Callable[[frozenset[int]], float], num_experts: int, count: int,
                 max_subsets: int = MAX_SUBSETS) -> frozenset[int]:
    """The `count` experts whose joint removal gives the least error: every subset when there are at most
    `max_subsets`, else greedy elimination."""
    if math.comb(num_experts, count) <= max_subsets:
        return min((frozenset(s) for s in itertools.combinations(range(num_experts), count)),
                   key=lambda s: (error(s), sorted(s)))
    return frozenset(greedy_removal_order(error, num_experts)[:count])


def order_scores(order: list[int], num_experts: int) -> torch.Tensor:
    """Scores from a removal order: removed first = lowest; the expert never removed scores highest."""
    scores = torch.full((num_experts,), float(num_experts), dtype=torch.float64)
    for rank, expert in enumerate(order):
        scores[expert] = float(rank)
    return scores


def route(logits: torch.Tensor, top_k: int, renormalize: bool, removed: frozenset[int] = frozenset()):
    """Softmax top-k routing of (tokens, experts) logits with `removed` experts masked out: (weights, index)."""
    if removed:
        logits = logits.clone()
        logits[:, sorted(removed)] = float("-inf")
    probs = torch.softmax(logits.float(), dim=-1)
    weights, index = torch.topk(probs, min(top_k, logits.shape[-1] - len(removed)), dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights.to(logits.dtype), index


class RouterSettings:
    """How a block's router routes: top-k and whether the kept gate values are renormalised (needs `router`)."""

    router: nn.Module

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    @property
    def renormalize(self) -> bool:
        return bool(getattr(self.router, "norm_topk_prob", True))


class MoELayer(RouterSettings):
    """One MoE block's router and experts modules, found from its experts group."""

    def __init__(self, model: nn.Module, group: Group):
        modules = dict(model.named_modules())
        owners = {s.param.rpartition(".")[0] for s in group.slices}
        params = dict(model.named_parameters())
        self.experts = modules[next(o for o in owners if any(params[s.param].dim() >= 3 for s in group.slices
                                                              if s.param.startswith(o + ".")))]
        self.router = modules[next(o for o in owners if modules[o] is not self.experts)]
        self.size = group.size
        self.inputs: list[torch.Tensor] = []

    def hook(self) -> torch.utils.hooks.RemovableHandle:
        def keep(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).detach()
            taken = sum(t.shape[0] for t in self.inputs)
            if taken < MAX_TOKENS:
                self.inputs.append(x[:MAX_TOKENS - taken])
        return self.router.register_forward_pre_hook(keep)

    @torch.no_grad()
    def routing(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, top-k weights, top-k index) as the model routes them."""
        x = torch.cat(self.inputs)
        logits, weights, index = self.router(x)
        return x, weights, index

    @torch.no_grad()
    def expert_output(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """One expert's output on `x`, through the model's own experts code (every token routed to it, gate 1)."""
        ones = torch.ones(x.shape[0], 1, dtype=x.dtype)
        return self.experts(x, torch.full((x.shape[0], 1), expert, dtype=torch.long), ones)

    @torch.no_grad()
    def removal_error(self, x: torch.Tensor, logits: torch.Tensor, reference: torch.Tensor,
                      removed: frozenset[int]) -> float:
        weights, index = route(logits, self.top_k, self.renormalize, removed)
        return float((self.experts(x, index, weights) - reference).double().pow(2).sum())


class _ExpertEstimator(Estimator):
    """Scores experts groups from routing statistics; every other group with `taylor`."""

    needs_calibration = True
    base = "taylor"

    def unit_scores(self, model, groups, batches, show_progress):
        experts = [g for g in groups if g.kind == GroupKind.EXPERTS]
        base = get_estimator(self.base)
        others = [g for g in groups if g.kind != GroupKind.EXPERTS]
        scores = score_groups(model, others, base, lambda: batches, show_progress) if others else {}
        self.loss_scaled = base.loss_scaled
        layers = {g.name: MoELayer(model, g) for g in experts}
        hooks = [layer.hook() for layer in layers.values()]
        try:
            with torch.no_grad():
                for input_ids in batches:
                    model(input_ids=input_ids, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        for name, layer in layers.items():
            scores[name] = self.expert_scores(layer)
        return scores

    def expert_scores(self, layer: MoELayer) -> torch.Tensor:
        raise NotImplementedError


@register_estimator
class ExpertFrequency(_ExpertEstimator):
    name = "expert-frequency"
    summary = "experts: fraction of calibration tokens routed to each expert; other groups: taylor"
    cost = "one no-grad forward pass with router hooks, plus taylor's gradients"

    def expert_scores(self, layer):
        _, _, index = layer.routing()
        return routing_frequency(index, layer.size)


@register_estimator
class Reap(_ExpertEstimator):
    name = "reap"
    summary = "experts: REAP, mean gate value x ||expert output|| over the tokens routed to it; others: taylor"
    cost = "one no-grad forward pass with router hooks, one expert call per expert and layer, plus taylor's gradients"

    def expert_scores(self, layer):
        x, weights, index = layer.routing()
        norms = torch.zeros(index.shape, dtype=torch.float64)
        for expert in range(layer.size):
            picks = (index == expert).nonzero()
            if len(picks):
                norms[picks[:, 0], picks[:, 1]] = layer.expert_output(x[picks[:, 0]], expert).double().norm(dim=-1)
        return reap_scores(index, weights, norms, layer.size)


@register_estimator
class ExpertReconstruction(_ExpertEstimator):
    name = "expert-reconstruction"
    summary = ("experts: greedy elimination by the MoE output error with experts dropped from the routing "
               "(NAEE-style); other groups: taylor")
    cost = "one no-grad forward pass with router hooks, O(experts^2) routed-expert calls per layer, plus taylor's gradients"

    def expert_scores(self, layer):
        x = torch.cat(layer.inputs)
        with torch.no_grad():
            logits = layer.router(x)[0]
            reference = layer.experts(x, *reversed(route(logits, layer.top_k, layer.renormalize)))
        return order_scores(greedy_removal_order(lambda s: layer.removal_error(x, logits, reference, s),
                                                 layer.size), layer.size)
