"""Retrain-free reconstruction of a pruned model, layer by layer (`--reconstruct ls|bias|obs`).

In each decoder layer the "consumers" are the linear layers whose input channels the plan removes (down_proj
for MLP channels, o_proj for heads; GPT-2's Conv1D, which stores the weight transposed, counts as linear). For each, calibration statistics are gathered on the pipeline's streams,
one of the solvers in `solvers.py` gives new weights, and the consumer is rewritten in place with zeros in the
removed columns, so the dense-shaped layer computes exactly what the physically pruned one will. `apply_plan`
then slices the zeros away. With `obs` the plan's choice of MLP channels (and of heads when they are not
nested in KV groups) is replaced by the OBS choice of the same count, and the plan is updated to match.

Modes: the consumer's targets are always the dense weights applied to its inputs (W x + b); "local" takes the
inputs from the dense model's own stream, "sequential" from the pruned model's running stream (SparseGPT/SlimGPT
style: each layer is fitted to the inputs it will actually see once the layers before it are pruned).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from depgraph_llm.graph.coupling import CouplingGraph
from depgraph_llm.errors import UserError
from depgraph_llm.graph.groups import GroupKind
from depgraph_llm.planning.plan import PrunePlan, axis_masks
from depgraph_llm.layers import InMemorySource, LayerCallback, LayerPipeline, LayerStep
from depgraph_llm.layers.callbacks import Recorder
from .head_obs import nested_head_columns, obs_select_per_block
from .solvers import anchored_least_squares, bias_correction, kept_block, obs_select, ridge

log = logging.getLogger(__name__)

METHODS = ("none", "ls", "bias", "obs")
MODES = ("local", "sequential")


@dataclass
class _Stats:
    """Sufficient statistics of one consumer's inputs: X^T X, the sum of X and the token count (float64)."""

    gram: torch.Tensor | None = None
    sum_x: torch.Tensor | None = None
    tokens: int = 0

    def add_x(self, x: torch.Tensor) -> None:
        x = x.double()
        if self.gram is None:
            self.gram = torch.empty(x.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
            add_gram_rows(self.gram, x, first=True)
        else:
            add_gram_rows(self.gram, x)
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        self.tokens += len(x)


GRAM_BLOCK_BYTES = 64 << 20  # one block of rows of X^T X in flight while a Gram is accumulated


def add_gram_rows(gram: torch.Tensor, x: torch.Tensor, first: bool = False) -> None:
    """gram += X^T X in place, a block of rows at a time: one Gram in memory instead of the old one, the product
    and their sum (3 x 1.6 GB for a 14336-wide down_proj). Each block holds the same values as those rows of the
    whole product (the BLAS accumulates every element over the same tokens; checked bit for bit in the tests)."""
    rows = max(1, GRAM_BLOCK_BYTES // (x.element_size() * x.shape[1]))
    for start in range(0, x.shape[1], rows):
        block = x[:, start:start + rows].T @ x
        if first:
            gram[start:start + rows] = block
        else:
            gram[start:start + rows] += block


def input_axis(module: nn.Module) -> int | None:
    """Axis of the weight that runs over input channels: 1 for nn.Linear, 0 for transformers' Conv1D (GPT-2)."""
    if isinstance(module, nn.Linear):
        return 1
    weight = getattr(module, "weight", None)
    if isinstance(getattr(module, "nf", None), int) and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return 0
    return None


@dataclass
class _Consumer:
    name: str
    module: nn.Module                       # nn.Linear or Conv1D
    keep: torch.Tensor                      # bool over input columns
    group: str | None = None                # group whose units OBS may re-choose
    units: list[torch.Tensor] | None = None  # input columns of each unit of that group
    blocks: list[int] | None = None          # query heads nested in KV groups: each unit's KV group
    stats: _Stats = field(default_factory=_Stats)


@dataclass
class ReconstructReport:
    """What reconstruction did, for prune_report.json."""

    method: str
    mode: str
    layers: int = 0
    consumers: int = 0
    reselected_groups: int = 0
    relative_error_before: float = 0.0  # mean over consumers of ||Y_naive - Y|| / ||Y|| on calibration data
    relative_error_after: float = 0.0

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def check_supported(coupling: CouplingGraph, plan: PrunePlan, method: str, mode: str) -> None:
    """One-line errors for combinations reconstruction cannot handle."""
    if method not in METHODS:
        raise UserError(f"--reconstruct {method!r} is not available; choose one of: {', '.join(METHODS)}")
    if mode not in MODES:
        raise UserError(f"--reconstruct-mode {mode!r} is not available; choose one of: {', '.join(MODES)}")
    if method == "none":
        return
    if coupling.layers_path is None:
        raise UserError("reconstruction runs layer by layer, but no decoder-layer list was found; use --reconstruct none")
    for group in coupling.of_kind(GroupKind.HIDDEN):  # vocabulary pruning leaves kept tokens' activations as they are
        if plan.hidden_method == "rotate":  # the rotated, zeroed stream is what the sliced model computes
            break
        if group.name in plan.keep and len(plan.keep[group.name]) < group.size:
            raise UserError(f"--reconstruct {method} cannot follow {group.kind.value} pruning (it changes every "
                            "layer's inputs); use --reconstruct none")


def _slices_by_axis(coupling: CouplingGraph) -> dict[tuple[str, int], list]:
    """(param, axis) -> [(group, group or its nested group, slice)] for every slice of every group."""
    touching: dict[tuple[str, int], list] = {}
    for group in coupling.groups:
        for g in (group, group.nested):
            if g is None:
                continue
            for s in g.slices:
                touching.setdefault((s.param, s.axis), []).append((group, g, s))
    return touching


def _consumers(modules: dict[str, nn.Module], touching: dict[tuple[str, int], list], layer_prefix: str,
               masks: dict[tuple[str, int], torch.Tensor], reselect: bool) -> list[_Consumer]:
    consumers = []
    for (param, axis), keep in masks.items():
        module_name, _, attr = param.rpartition(".")
        module = modules.get(module_name)
        if (module is None or axis != input_axis(module) or attr != "weight" or bool(keep.all())
                or not module_name.startswith(layer_prefix)):
            continue
        consumer = _Consumer(module_name, module, keep.clone())
        owners = touching.get((param, axis), [])
        if reselect and len(owners) == 1:
            group, g, s = owners[0]
            if g is group and (group.nested is None or group.nested.size == 1) and group.kind in (
                    GroupKind.CHANNELS, GroupKind.HEADS):
                consumer.group = group.name
                consumer.units = [s.unit_indices(u) for u in range(group.size)]
        if reselect and consumer.group is None and (nested := _nested_heads(owners)) is not None:
            consumer.group, consumer.units, consumer.blocks = nested
        consumers.append(consumer)
    return consumers


def _nested_heads(owners: list) -> tuple[str, list[torch.Tensor], list[int]] | None:
    """(nested group, columns of each query head, KV group of each) when the consumer's inputs run over query
    heads nested in KV groups (o_proj under grouped-query attention); else None."""
    nested = [(group, g, s) for group, g, s in owners if g is not group]
    if len(owners) != 2 or len(nested) != 1:
        return None
    group, g, s = nested[0]
    if group.kind != GroupKind.HEADS or g.size < 2 or group.queries_per_unit != 1 or s.outer is None:
        return None
    units, blocks = nested_head_columns(s, group.size, g.size)
    return g.name, units, blocks


class Reconstruction(LayerCallback):
    """The layer-pipeline stage that refits every layer's consumers in place (zeros in removed columns).

    Removed layers: the dense stream goes through them in "local" mode, the pruned model skips them in
    "sequential" mode. Kept layers: statistics on the dense run, one solve per consumer, and in "sequential"
    mode the next layer sees the reconstructed layer's outputs."""

    def __init__(self, coupling: CouplingGraph, plan: PrunePlan, method: str, mode: str, damp: float = 0.01) -> None:
        self.coupling, self.plan, self.method, self.mode, self.damp = coupling, plan, method, mode, damp
        self.report = ReconstructReport(method=method, mode=mode)
        self.masks = axis_masks(coupling, plan)
        if plan.hidden_method == "rotate":  # the stream is zeroed past k already: its readers keep their weights
            hidden = {(s.param, s.axis) for g in coupling.of_kind(GroupKind.HIDDEN) for s in g.slices}
            self.masks = {key: mask for key, mask in self.masks.items() if key not in hidden}
        self.touching = _slices_by_axis(coupling)
        self.removed = set(plan.removed_layers)
        self._consumers: list[_Consumer] = []
        self._recorder = Recorder()
        self._errors_before: list[float] = []
        self._errors_after: list[float] = []

    def before_layer(self, step: LayerStep) -> None:
        self._consumers = []
        if step.index in self.removed:
            step.skip_run = self.mode == "sequential"
            return
        modules = {f"{step.name}.{name}" if name else step.name: m for name, m in step.layer.named_modules()}
        self._consumers = _consumers(modules, self.touching, f"{step.name}.", self.masks, self.method == "obs")
        order = list(modules)  # registration order, which is the order a decoder layer runs them in
        self._consumers.sort(key=lambda c: order.index(c.name))
        for c in self._consumers:
            self._recorder.inputs(c.module, c.stats.add_x)

    def after_layer(self, step: LayerStep) -> None:
        self._recorder.close()
        if step.index in self.removed:
            return
        for position, consumer in enumerate(self._consumers):
            if position and self.mode == "sequential":
                self.restat(step, self._consumers[position:])
            before, after = _solve(consumer, self.method, self.damp, self.plan, self.plan.reconstruct_anchor)
            self._errors_before.append(before)
            self._errors_after.append(after)
            self.report.reselected_groups += consumer.group is not None and self.method == "obs"
        self.report.consumers += len(self._consumers)
        self.report.layers += 1
        self._consumers = []
        if self.mode == "sequential":  # the next layer sees what the reconstructed (pruned) layer computes
            step.next_stream = step.rerun()

    def restat(self, step: LayerStep, consumers: list[_Consumer]) -> None:
        """Sequential mode, made exact: the statistics of the consumers still to solve, gathered again once the
        ones before them are refitted (down_proj sees the inputs the refitted o_proj gives, not the dense ones)."""
        for consumer in consumers:
            consumer.stats = _Stats()
            self._recorder.inputs(consumer.module, consumer.stats.add_x)
        step.rerun()
        self._recorder.close()

    def finish(self) -> None:
        if self._errors_before:
            self.report.relative_error_before = sum(self._errors_before) / len(self._errors_before)
            self.report.relative_error_after = sum(self._errors_after) / len(self._errors_after)


def prepare_reconstruction(coupling: CouplingGraph, plan: PrunePlan, batches: list[torch.Tensor], method: str,
                           mode: str, damp: float = 0.01) -> Reconstruction | None:
    """The reconstruction callback for a layer-pipeline pass (None for method "none"), after the checks."""
    check_supported(coupling, plan, method, mode)
    if method == "none":
        return None
    if not batches:
        raise UserError(f"--reconstruct {method} needs calibration text; pass --calibration FILE or self")
    return Reconstruction(coupling, plan, method, mode, damp)


@torch.no_grad()
def reconstruct(model: nn.Module, coupling: CouplingGraph, plan: PrunePlan, batches: list[torch.Tensor],
                method: str = "ls", mode: str = "sequential", damp: float = 0.01, device: torch.device | None = None,
                show_progress: bool = False) -> ReconstructReport:
    """Rewrite the consumers of every layer in place (zeros in removed columns); may update `plan.keep` (obs)."""
    callback = prepare_reconstruction(coupling, plan, batches, method, mode, damp)
    if callback is None:
        return ReconstructReport(method=method, mode=mode)
    progress = None
    if show_progress:
        progress = lambda items, total: tqdm(items, total=total, desc=f"reconstruct ({method}, {mode})",  # noqa: E731
                                             unit="layer")
    LayerPipeline(InMemorySource(model, coupling.layers_path, device), [callback], progress=progress).run(batches)
    return callback.report


def _solve(consumer: _Consumer, method: str, damp: float, plan: PrunePlan | None,
           anchor: float = 0.0) -> tuple[float, float]:
    """New weights for one consumer; returns the relative output error before and after (on calibration).

    Memory: the Gram is dropped once its kept block is gathered (before the solve), the targets are kept on the
    kept rows only, and the solve damps the kept block in place (solvers.solve_damped); the values computed are
    those of the plain formulas, bit for bit."""
    stats, module = consumer.stats, consumer.module
    if method == "bias" and module.bias is None:  # refuse before anything (weights, plan) is written
        raise UserError(f"{consumer.name} has no bias to hold the compensation; use --reconstruct ls")
    transposed = input_axis(module) == 0  # Conv1D: (in, out); solve in the linear (out, in) layout
    weight = module.weight.detach().double().cpu()
    weight = weight.T if transposed else weight
    bias = module.bias.detach().double().cpu() if module.bias is not None else None
    b = bias if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    gram, sum_x, tokens = stats.gram.cpu(), stats.sum_x.cpu(), stats.tokens
    stats.gram = None  # this function holds the last reference: freed as soon as its kept block is gathered
    keep = consumer.keep
    if method == "obs" and consumer.units is not None:
        keep = _obs_keep(consumer, weight, gram, damp, plan)
    kept = keep.nonzero().flatten()
    # the targets are what the dense layer computes on the same inputs: Y = X W^T + b
    cross = gram @ weight.T
    _add_outer(cross, sum_x, b)
    cross_kept = cross[kept]
    del cross
    sum_y = weight @ sum_x + tokens * b
    y_energy = torch.einsum("oi,ij,oj->", weight, gram, weight) + 2 * b @ (weight @ sum_x) + tokens * b @ b
    gram_kept, ridge_value = kept_block(gram, kept), ridge(gram, damp)
    del gram
    sum_x_kept = sum_x[kept]
    new_bias = b
    if method == "bias":
        new_weight = weight[:, kept]
        new_bias = bias_correction(sum_x / tokens, sum_y / tokens, weight, kept)
    else:  # targets minus the bias, which is kept or fitted apart
        new_weight = anchored_least_squares(gram_kept, cross_kept - sum_x_kept[:, None] * b, weight[:, kept],
                                            ridge_value, anchor)

    def residual(w_kept: torch.Tensor, bias_vec: torch.Tensor) -> float:
        value = (torch.einsum("oi,ij,oj->", w_kept, gram_kept, w_kept)
                 - 2 * torch.einsum("oi,io->", w_kept, cross_kept) + 2 * bias_vec @ (w_kept @ sum_x_kept)
                 - 2 * bias_vec @ sum_y + tokens * bias_vec @ bias_vec + y_energy)
        return float(value.clamp_min(0) / y_energy.clamp_min(1e-30)) ** 0.5

    before, after = residual(weight[:, kept], b), residual(new_weight, new_bias)
    del gram_kept, cross_kept
    full = torch.zeros_like(weight)
    del weight
    full[:, kept] = new_weight
    del new_weight
    module.weight.copy_((full.T if transposed else full).to(module.weight.dtype))
    if module.bias is not None:
        module.bias.copy_(new_bias.to(module.bias.dtype))
    return before, after


def _add_outer(cross: torch.Tensor, sum_x: torch.Tensor, b: torch.Tensor, rows: int = 1024) -> None:
    """cross += sum_x[:, None] * b, a block of rows at a time (the same sums as the whole outer product's)."""
    for start in range(0, len(cross), rows):
        cross[start:start + rows] += sum_x[start:start + rows, None] * b


OBS_CHOOSER = "obs-reconstruction"  # what PrunePlan.chosen_by records for units OBS re-chose


def _obs_keep(consumer: _Consumer, weight, gram, damp: float, plan: PrunePlan) -> torch.Tensor:
    """Replace the plan's choice of units for the consumer's group by the OBS choice of the same count."""
    if consumer.blocks is not None:
        return _obs_keep_nested(consumer, weight, gram, damp, plan)
    units = consumer.units
    n_remove = sum(1 for cols in units if not bool(consumer.keep[cols].all()))
    removed = set(obs_select(weight, gram, units, n_remove, damp))
    kept_units = [u for u in range(len(units)) if u not in removed]
    plan.keep[consumer.group] = kept_units
    plan.chosen_by[consumer.group] = OBS_CHOOSER
    keep = torch.zeros_like(consumer.keep)
    for u in kept_units:
        keep[units[u]] = True
    return keep


def _obs_keep_nested(consumer: _Consumer, weight, gram, damp: float, plan: PrunePlan) -> torch.Tensor:
    """Query heads nested in KV groups: the OBS choice of the same number of heads in every KV group (the
    planner's choice stays when whole KV groups go too)."""
    units, blocks = consumer.units, consumer.blocks
    sizes = Counter(blocks)
    quota = Counter(blocks[u] for u, cols in enumerate(units) if not bool(consumer.keep[cols].all()))
    if any(quota[b] >= sizes[b] for b in quota):
        return consumer.keep
    removed = set(obs_select_per_block(weight, gram, units, blocks, dict(quota), damp))
    per_group = sizes[blocks[0]]
    plan.keep_nested[consumer.group] = [[j for j in range(per_group) if g * per_group + j not in removed]
                                        for g in range(len(sizes))]
    plan.chosen_by[consumer.group] = OBS_CHOOSER
    keep = consumer.keep.clone()
    for u, cols in enumerate(units):
        keep[cols] = u not in removed
    return keep
