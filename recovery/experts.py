"""Reconstruction after routed-expert removal (`--expert-reconstruct drop|router|merge`), layer by layer.

Removing experts sends the tokens that used them elsewhere. Three registered ways to deal with that:
- `drop`: nothing; the router's rows of the kept experts stay, the model's own top-k picks among them.
- `router`: refit the kept experts' router rows (and bias, if the router has one) by least squares on the
  calibration tokens. Every removed expert r is assigned to the kept expert m(r) whose output is most similar to
  its own (cosine over the calibration tokens, every token sent to both); a kept expert e and the removed experts
  assigned to it form its *cluster* C(e). The target logit of e is log sum_{j in C(e)} exp(z_j): the cluster
  takes the dense probability mass of its members, so the pruned softmax over kept experts equals the dense
  softmax summed over clusters (same partition function), and a token that went to r now goes to its closest
  substitute with r's weight. The fit minimises sum_t sum_e (W'_e x_t + b'_e - log sum_{j in C(e)} exp z_j(x_t))^2
  over the kept rows, solved as a ridge-damped correction to the dense rows (a never-routed removed expert adds
  exp(-huge) to its cluster: a zero target correction, so the dense rows come back bit for bit).
  Removed experts join clusters greedily, most similar first, each only where the layer's routed-output error on
  held-out calibration tokens (the last quarter, not fitted) falls (the dense layer's output on the same inputs
  is the target).
- `merge`: MC-SMoE-style: each kept expert's weights become the routing-frequency-weighted average of its
  cluster's (members the router never picks on calibration add nothing), then the router refit above.

The solve works the same for Mixtral (softmax over the top-k), Qwen2-MoE and Qwen3-MoE (softmax, then top-k,
`norm_topk_prob` on or off): only the logits are fitted, and the model's own routing runs on them. By the
greedy acceptance the result is never worse than drop-only on the held-out calibration tokens (a layer where no
removed expert helps stays drop-only). The report gives both errors per layer.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from depgraph_llm.errors import UserError
from depgraph_llm.graph.coupling import CouplingGraph
from depgraph_llm.graph.groups import Group, GroupKind
from depgraph_llm.importance.experts import MAX_TOKENS, RouterSettings, route, routing_frequency
from depgraph_llm.layers import LayerCallback, LayerStep
from depgraph_llm.planning.plan import PrunePlan

RIDGE = 1e-4  # relative to the mean diagonal of X^T X: shrinks the correction towards the dense rows
HELD_OUT = 4  # the last 1/HELD_OUT of a layer's calibration tokens judge each join; the rest are fitted


# ---- the math, as pure functions on tensors ----------------------------------------------------------------

def output_similarity(removed: list[torch.Tensor], kept: list[torch.Tensor]) -> torch.Tensor:
    """Cosine similarity (removed x kept) between experts' outputs on the same tokens (each (tokens, hidden))."""
    a = torch.stack([o.double().flatten() for o in removed])
    b = torch.stack([o.double().flatten() for o in kept])
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-30)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return a @ b.T


def assign_clusters(similarity: torch.Tensor, kept: list[int], removed: list[int]) -> dict[int, list[int]]:
    """Kept expert -> its cluster: itself first, then the removed experts most similar to it (ties: lower index)."""
    clusters = {e: [e] for e in kept}
    for row, r in enumerate(removed):
        clusters[kept[int(torch.argmax(similarity[row]))]].append(r)
    return clusters


def cluster_logits(logits: torch.Tensor, clusters: dict[int, list[int]]) -> torch.Tensor:
    """(tokens, kept) target logits: per kept expert, logsumexp of its cluster's dense logits (float64)."""
    z = logits.double()
    return torch.stack([torch.logsumexp(z[:, members], dim=-1) for members in clusters.values()], dim=-1)


def refit_rows(x: torch.Tensor, dense: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None, ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares router rows (and bias) with x W'^T + b' ~ target, as a ridge-damped correction D of the dense
    rows fitted to target - dense (the dense logits of those rows); zero residual targets give D = 0 exactly."""
    features = x.double()
    if bias is not None:
        features = torch.cat([features, torch.ones(len(features), 1, dtype=torch.float64)], dim=1)
    gram = features.T @ features
    damp = ridge * float(gram.diagonal().mean().clamp_min(1e-30))
    residual = target.double() - dense.double()
    correction = torch.linalg.solve(gram + damp * torch.eye(len(gram), dtype=gram.dtype), features.T @ residual).T
    new_weight = weight.double() + correction[:, :weight.shape[1]]
    new_bias = None if bias is None else bias.double() + correction[:, -1]
    return new_weight, new_bias


def merge_rows(rows: torch.Tensor, members: list[int], frequency: torch.Tensor) -> torch.Tensor | None:
    """The frequency-weighted average of `rows[members]` (expert axis 0), over the members the router picks; None
    when only the first member (the kept expert) or none is picked (nothing to merge)."""
    used = [m for m in members if float(frequency[m]) > 0]
    if not used or used == [members[0]]:
        return None
    weights = frequency[used].double() / frequency[used].double().sum()
    return torch.einsum("m,m...->...", weights, rows[used].double())


# ---- one MoE block --------------------------------------------------------------------------------------------

@dataclass
class MoEBlock(RouterSettings):
    """A layer's router and experts modules, and the experts group's per-expert tensors (name -> expert axis)."""

    router: nn.Module
    experts: nn.Module
    tensors: dict[str, int]

    def logits(self, x: torch.Tensor, weight: torch.Tensor | None = None, bias=None) -> torch.Tensor:
        weight = self.router.weight if weight is None else weight
        bias = getattr(self.router, "bias", None) if bias is None else bias
        return nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @torch.no_grad()
    def routed_output(self, x: torch.Tensor, logits: torch.Tensor, removed: frozenset[int]) -> torch.Tensor:
        weights, index = route(logits, self.top_k, self.renormalize, removed)
        return self.experts(x, index, weights.to(x.dtype))

    @torch.no_grad()
    def expert_output(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        return self.experts(x, torch.full((x.shape[0], 1), expert, dtype=torch.long, device=x.device), ones)


def moe_block(layer: nn.Module, prefix: str, group: Group) -> MoEBlock:
    """The router and experts modules of `group` inside `layer` (whose parameters are named `prefix` + ...)."""
    modules = dict(layer.named_modules())
    params = dict(layer.named_parameters())
    local = {s.param.removeprefix(prefix): s.axis for s in group.slices if s.param.startswith(prefix)}
    owners = {name.rpartition(".")[0] for name in local}
    experts = next(o for o in owners if any(params[n].dim() >= 3 for n in local if n.rpartition(".")[0] == o))
    router = next(o for o in owners if o != experts)
    tensors = {n.rpartition(".")[2]: axis for n, axis in local.items() if n.rpartition(".")[0] == experts}
    return MoEBlock(modules[router], modules[experts], tensors)


@dataclass
class LayerResult:
    """One MoE layer's calibration errors (relative to the dense routed output): drop-only and the result, and
    how many removed experts joined a kept expert's cluster (0: the layer stays drop-only)."""

    layer: int
    error_drop: float
    error_after: float
    joined: int = 0


def _relative(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30))


@dataclass
class _Saved:
    """A block's router and per-expert tensors as they were (drop-only), to restore before each trial."""

    tensors: dict[str, torch.Tensor]
    weight: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def of(cls, block: MoEBlock) -> "_Saved":
        bias = getattr(block.router, "bias", None)
        return cls({name: getattr(block.experts, name).detach().clone() for name in block.tensors},
                   block.router.weight.detach().clone(), bias.detach().clone() if isinstance(bias, torch.Tensor) else None)

    def restore(self, block: MoEBlock) -> None:
        for name, value in self.tensors.items():
            getattr(block.experts, name).copy_(value)
        block.router.weight.copy_(self.weight)
        if self.bias is not None:
            block.router.bias.copy_(self.bias)


def split_tokens(count: int, held_out: int = HELD_OUT) -> tuple[slice, slice]:
    """(fitted, judged) token ranges: the last count // held_out tokens are held out (all tokens both ways when
    fewer than 2 * held_out): a router fit to as many tokens as hidden channels would interpolate them."""
    if count < 2 * held_out:
        return slice(0, count), slice(0, count)
    cut = count - count // held_out
    return slice(0, cut), slice(cut, count)


def _apply_clusters(block: MoEBlock, saved: _Saved, x: torch.Tensor, dense_logits: torch.Tensor,
                    clusters: dict[int, list[int]], frequency: torch.Tensor, merge: bool, ridge: float) -> None:
    """From the drop-only state: merge each cluster into its kept expert (with `merge`), refit the kept rows."""
    saved.restore(block)
    kept = list(clusters)
    if merge:
        for e, members in clusters.items():
            for name, axis in block.tensors.items():
                tensor = getattr(block.experts, name)
                new = merge_rows(saved.tensors[name].movedim(axis, 0), members, frequency)
                if new is not None:
                    tensor.select(axis, e).copy_(new.to(tensor.dtype))
    weight, bias = refit_rows(x, dense_logits[:, kept], cluster_logits(dense_logits, clusters), saved.weight[kept],
                              saved.bias[kept] if saved.bias is not None else None, ridge)
    block.router.weight[kept] = weight.to(block.router.weight.dtype)
    if bias is not None:
        block.router.bias[kept] = bias.to(block.router.bias.dtype)


@torch.no_grad()
def reconstruct_block(block: MoEBlock, x: torch.Tensor, kept: list[int], merge: bool,
                      ridge: float = RIDGE) -> LayerResult:
    """Refit (and with `merge`, merge into) the kept experts of `block` in place on inputs `x`. Removed experts
    join their nearest kept expert's cluster greedily, most similar first, each only if the routed-output error
    on the held-out tokens of `x` (`split_tokens`) falls; so the result is never worse than drop-only there.
    Similarity, frequencies and the fit use the other tokens. Removed experts stay in place (the slice step
    drops them); the errors reported are on the held-out tokens."""
    size = block.router.weight.shape[0]
    removed = [e for e in range(size) if e not in kept]
    fitted, judged = split_tokens(len(x))
    x, check = x[fitted], x[judged]
    dense_logits = block.logits(x)
    reference = block.routed_output(check, block.logits(check), frozenset())
    drop_error = _relative(block.routed_output(check, block.logits(check), frozenset(removed)), reference)
    similarity = output_similarity([block.expert_output(x, r) for r in removed],
                                   [block.expert_output(x, e) for e in kept])
    nearest = assign_clusters(similarity, kept, removed)
    partner = {r: e for e, members in nearest.items() for r in members[1:]}
    frequency = routing_frequency(route(dense_logits, block.top_k, block.renormalize)[1], size)
    saved = _Saved.of(block)
    clusters, best = {e: [e] for e in kept}, drop_error
    for row in sorted(range(len(removed)), key=lambda i: (-float(similarity[i].max()), removed[i])):
        r = removed[row]
        trial = {e: members + [r] if e == partner[r] else list(members) for e, members in clusters.items()}
        _apply_clusters(block, saved, x, dense_logits, trial, frequency, merge, ridge)
        error = _relative(block.routed_output(check, block.logits(check), frozenset(removed)), reference)
        if error < best:
            clusters, best = trial, error
    joined = sum(len(m) - 1 for m in clusters.values())
    if joined:
        _apply_clusters(block, saved, x, dense_logits, clusters, frequency, merge, ridge)
    else:
        saved.restore(block)
    return LayerResult(-1, drop_error, best, joined)


# ---- the registry and the layer-pipeline stage --------------------------------------------------------------

@dataclass(frozen=True)
class ExpertMethod:
    """One way of handling removed experts: what it does to a kept block (None: nothing) and a summary."""

    name: str
    summary: str
    apply: Callable[[MoEBlock, torch.Tensor, list[int]], LayerResult] | None


EXPERT_METHODS: dict[str, ExpertMethod] = {}


def register_method(method: ExpertMethod) -> ExpertMethod:
    EXPERT_METHODS[method.name] = method
    return method


register_method(ExpertMethod("drop", "remove the experts; the kept experts' router rows stay as they are", None))
register_method(ExpertMethod(
    "router", "refit the kept experts' router rows by least squares to the logsumexp of their clusters' dense "
    "logits (each removed expert joins the kept expert with the most similar output)",
    lambda block, x, kept: reconstruct_block(block, x, kept, merge=False)))
register_method(ExpertMethod(
    "merge", "fold each removed expert into the kept expert with the most similar output (weights averaged by "
    "routing frequency, MC-SMoE-style), then the router refit",
    lambda block, x, kept: reconstruct_block(block, x, kept, merge=True)))


def get_method(name: str) -> ExpertMethod:
    """The registered expert-reconstruction method `name`, or a one-line error listing them."""
    if name not in EXPERT_METHODS:
        raise UserError(f"--expert-reconstruct {name!r} is not available; choose one of: {', '.join(EXPERT_METHODS)}")
    return EXPERT_METHODS[name]


@dataclass
class ExpertReport:
    """What expert reconstruction did, for prune_plan.json / prune_report.json."""

    method: str
    layers: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        count = max(1, len(self.layers))
        return {"method": self.method, "moe_layers": len(self.layers),
                "changed_layers": sum(1 for r in self.layers if r["joined"]),
                "joined_experts": sum(r["joined"] for r in self.layers),
                "relative_error_drop": round(sum(r["error_drop"] for r in self.layers) / count, 6),
                "relative_error_after": round(sum(r["error_after"] for r in self.layers) / count, 6),
                "per_layer": self.layers}


class ExpertReconstruction(LayerCallback):
    """The layer-pipeline stage: gathers each MoE block's inputs on the layer's run, refits / merges its kept
    experts, then (sequential mode) reruns the layer with the removed experts masked out of the routing so the next
    layer sees what the pruned layer computes."""

    def __init__(self, coupling: CouplingGraph, plan: PrunePlan, method: str, sequential: bool = True) -> None:
        self.method = get_method(method)
        self.plan, self.sequential = plan, sequential
        self.groups = {g.layer: g for g in coupling.of_kind(GroupKind.EXPERTS)
                       if g.layer is not None and len(plan.keep.get(g.name, range(g.size))) < g.size
                       and g.layer not in set(plan.removed_layers)}
        self.report = ExpertReport(method)
        self._inputs: list[torch.Tensor] = []
        self._handles: list = []
        self._block: MoEBlock | None = None

    def _clear(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._inputs, self._block = [], [], None

    def before_layer(self, step: LayerStep) -> None:
        self._clear()
        group = self.groups.get(step.index)
        if group is None or self.method.apply is None:
            return
        self._block = moe_block(step.layer, f"{step.name}.", group)

        def keep(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).detach()
            taken = sum(len(t) for t in self._inputs)
            if taken < MAX_TOKENS:
                self._inputs.append(x[:MAX_TOKENS - taken])

        self._handles.append(self._block.router.register_forward_pre_hook(keep))

    def after_layer(self, step: LayerStep) -> None:
        block, group = self._block, self.groups.get(step.index)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if block is None or not self._inputs:
            return
        kept = list(self.plan.keep[group.name])
        x = torch.cat(self._inputs)
        self._inputs = []
        result = self.method.apply(block, x.to(block.router.weight.dtype), kept)
        result.layer = step.index
        self.report.layers.append({k: (round(v, 6) if isinstance(v, float) else v)
                                   for k, v in result.__dict__.items()})
        removed = frozenset(e for e in range(group.size) if e not in kept)
        self._handles.append(block.router.register_forward_hook(_masked_routing(block, removed)))
        if self.sequential:
            step.next_stream = step.rerun()

    def finish(self) -> None:
        self._clear()


def _masked_routing(block: MoEBlock, removed: frozenset[int]):
    """A router forward hook that routes as the pruned block will (removed experts out of the top-k), so the
    dense-shaped layer computes what the sliced one will until the slice step. Routers return (logits, top-k
    weights, top-k indices)."""
    def hook(module, args, output):
        logits = output[0]
        weights, index = route(logits, block.top_k, block.renormalize, removed)
        return logits, weights.to(output[1].dtype), index.to(output[2].dtype)
    return hook


def prepare_expert_reconstruction(coupling: CouplingGraph, plan: PrunePlan, batches: list[torch.Tensor],
                                  method: str, sequential: bool = True) -> ExpertReconstruction | None:
    """The expert-reconstruction stage for a layer-pipeline pass, or None (drop, or no experts removed)."""
    chosen = get_method(method)
    if chosen.apply is None:
        return None
    callback = ExpertReconstruction(coupling, plan, method, sequential)
    if not callback.groups:
        return None
    for group in coupling.of_kind(GroupKind.HIDDEN):  # the refitted rows would lose columns after the fit
        if len(plan.keep.get(group.name, range(group.size))) < group.size:
            raise UserError(f"--expert-reconstruct {method} cannot follow hidden pruning (the router's inputs "
                            "change after the fit); use --expert-reconstruct drop")
    if not batches:
        raise UserError(f"--expert-reconstruct {method} needs calibration text; pass --calibration FILE or self")
    return callback
