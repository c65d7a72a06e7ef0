"""Trace, score, plan and apply on a model held in memory (one layer-pipeline pass for applying)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import torch

from depgraph_llm.checkpoint.device_map import is_spread
from depgraph_llm.errors import UserError
from depgraph_llm.graph.coupling import CouplingGraph, build_coupling
from depgraph_llm.graph.groups import GroupKind
from depgraph_llm.importance import get_estimator, score_groups
from depgraph_llm.importance.base import score_groups_streaming
from depgraph_llm.importance.depth import angular_distance, angular_distances, block_influence
from depgraph_llm.job.options import PruneOptions, allocation_for, parse_schedule
from depgraph_llm.job.timing import StageTimer
from depgraph_llm.layers import InMemorySource, LayerPipeline
from depgraph_llm.layers.sink import SliceSink
from depgraph_llm.models import nearest_supported, spec_for
from depgraph_llm.planning.budget import (RATIO_TOLERANCE, Allocation, ParamCounter, Widths, check_reachable,
                                            plan_depth, plan_uniform)
from depgraph_llm.planning.plan import PrunePlan
from depgraph_llm.planning.schedules import NONUNIFORM, REDISTRIBUTED, plan_nonuniform
from depgraph_llm.planning.search import LAYER_DROP_CHANCE, SearchSettings
from depgraph_llm.planning.refit_fitness import RefitSettings
from depgraph_llm.planning.search_schedule import SearchInputs, plan_search
from depgraph_llm.recovery.bias_params import enable_zero_biases
from depgraph_llm.recovery.cross_block import CrossBlock, prepare_cross_block
from depgraph_llm.recovery.experts import prepare_expert_reconstruction
from depgraph_llm.recovery.reconstruct import check_supported, prepare_reconstruction
from depgraph_llm.recovery.rotation import finish_sliced_norms, rotate_residual, untie_head
from depgraph_llm.removal.apply import finish_plan, stock_config_accepts

# (make_plan, coupling, allocation) -> the allocation to plan with; make_plan plans one allocation
AllocationChooser = Callable[[Callable[[Allocation], PrunePlan], CouplingGraph, Allocation], Allocation]


def config_accepts(model, spec, widths: Widths) -> bool:
    """Would the model's own config class accept these uniform widths? (stock validators, e.g. hidden % heads)"""
    config = model.config
    updates = {}
    if widths.mlp is not None:
        updates[spec.mlp_width_field] = widths.mlp
    if widths.kv is not None:
        q_heads = widths.kv * (widths.q_per_kv or 1)
        updates[spec.q_heads_field] = q_heads
        if spec.kv_heads_field and getattr(config, spec.kv_heads_field, None) is not None:
            updates[spec.kv_heads_field] = widths.kv
    return stock_config_accepts(config, updates)


def stock_check(model, spec) -> Callable[[Widths], bool]:
    """`config_accepts` for this model, as the planners' `is_valid`."""
    return lambda widths: config_accepts(model, spec, widths)


def depth_plan(model, coupling: CouplingGraph, counter: ParamCounter, calibration: list[torch.Tensor], ratio: float,
                metric: str, count: int | None = None, source=None) -> list[int]:
    if coupling.layers_path is None:
        raise UserError("no decoder-layer list found in this model; depth pruning is not possible, use --schedule uniform")
    if not calibration:
        raise UserError("depth pruning needs calibration text; pass --calibration FILE")
    layers = model.get_submodule(coupling.layers_path)
    influence = block_influence(model, layers, calibration, source)
    matrix = angular_distances(model, layers, calibration, source) if metric == "angular" else None
    return plan_depth(counter, influence, ratio, contiguous=metric == "angular",
                      angular=lambda span: angular_distance(model, layers, calibration, span, matrix), count=count)


def couple_or_explain(model) -> CouplingGraph:
    """build_coupling, turning a tracing failure into a one-line error that points to the fix."""
    try:
        return build_coupling(model)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types for unsupported code
        model_type = getattr(model.config, "model_type", type(model).__name__)
        raise UserError(f"cannot trace {model_type!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                        f"the nearest supported architecture is {nearest_supported(model_type)!r}; "
                        "see docs/new-architecture.md") from exc


def prune_in_memory(model, calibration: list[torch.Tensor], options: PruneOptions, *, source_hash: str = "",
                    timer: "StageTimer | None" = None, apply: bool = True,
                    search_windows: list[torch.Tensor] | None = None,
                    allocation: Allocation | None = None,
                    heldout: list[torch.Tensor] | None = None,
                    choose_allocation: "AllocationChooser | None" = None) -> tuple[PrunePlan, "CouplingGraph"]:
    """Trace, score, plan and physically prune `model` in place; returns the plan and coupling.

    Reads from `options`: importance, ratio, round_to, seed, schedule, depth_metric, reconstruct,
    reconstruct_mode, show_progress (and the per-kind ratios when no `allocation` is given).
    schedule "uniform": same widths in every layer. "depth": remove whole decoder layers (Block Influence or
    angular distance on the calibration batches) and trim the rest uniformly to land on the exact ratio.
    reconstruct "ls"/"bias"/"obs": refit the layers that lose input channels on the calibration batches
    (recovery/reconstruct.py); "bias" first gives the model zero biases through its config switches, so the
    planner counts them. Applying is one layer-pipeline pass (reconstruct, then slice each layer) and a final
    config step."""
    timer = timer or StageTimer()
    plan, coupling = plan_in_memory(model, calibration, options, source_hash, timer, allocation,
                                    search_windows=search_windows, choose_allocation=choose_allocation)
    if apply:
        (apply_rotated if plan.hidden_method == "rotate" else apply_in_memory)(model, coupling, plan, calibration,
                                                                               options, timer, heldout)
    return plan, coupling


def plan_in_memory(model, calibration: list[torch.Tensor], options: PruneOptions, source_hash: str, timer: "StageTimer",
                   allocation: Allocation | None = None, source=None,
                   search_windows: list[torch.Tensor] | None = None,
                   choose_allocation: "AllocationChooser | None" = None) -> tuple[PrunePlan, CouplingGraph]:
    """Trace, score and plan (the model is unchanged, except for the zero biases of --reconstruct bias); with a
    streaming `source`, `model` is its skeleton and every pass visits the layers one at a time.
    `choose_allocation(make_plan, coupling, allocation)` may replace the allocation once the model is scored, by
    trying candidates through `make_plan` (the planner for one allocation)."""
    estimator = get_estimator(options.importance)
    ratio, seed, schedule = options.ratio, options.seed, options.schedule
    reconstruct, reconstruct_mode, depth_metric = options.reconstruct, options.reconstruct_mode, options.depth_metric
    spec = spec_for(model.config.model_type)
    params_before = sum(p.numel() for p in model.parameters())
    if reconstruct == "bias":  # zero biases that the compensation will fill; the ratio stays relative to the source
        added = enable_zero_biases(model, spec.bias_switches)
        if source is not None:  # a streamed layer gets them when it is read from the shards
            source.zero_params.update(added)
    hidden_method = getattr(options, "hidden_method", "select")
    untied = hidden_method == "rotate" and untie_head(model)  # a tied head cannot hold the norm-folded rotation
    with timer("trace_and_couple"):
        coupling = couple_or_explain(model)
    counter = ParamCounter({name: tuple(p.shape) for name, p in model.named_parameters()}, coupling)
    layer_count = len(coupling.of_kind(GroupKind.LAYER))
    allocation = allocation or allocation_for(options, layer_count)
    schedule_name, _ = parse_schedule(schedule)
    if schedule_name != "depth" and not allocation.layers_removed and choose_allocation is None:
        # depth plans and --vocab-keep auto change the count from calibration; every other plan starts uniform
        check_reachable(coupling, counter, ratio, allocation.width_step(options.round_to), stock_check(model, spec),
                        params_before, allocation)
    torch.manual_seed(seed)
    with timer("importance"):
        scores = (score_groups(model, coupling.groups, estimator, lambda: calibration, options.show_progress)
                  if source is None else
                  score_groups_streaming(source, coupling.groups, estimator, calibration, options.show_progress))
    removed_layers: list[int] = []
    if schedule_name == "depth" or allocation.layers_removed:
        with timer("depth_importance"):
            removed_layers = depth_plan(model, coupling, counter, calibration, ratio, depth_metric,
                                         allocation.layers_removed, source)
        counter = counter.without_layers(frozenset(removed_layers))

    def make_plan(allocation: Allocation) -> PrunePlan:
        return _plan_widths(model, spec, coupling, counter, scores, options, allocation, removed_layers,
                            params_before, source_hash, search_windows, estimator, calibration)

    if choose_allocation is not None:  # e.g. --vocab-keep auto: try candidate allocations through the planner
        with timer("vocabulary"):
            allocation = choose_allocation(make_plan, coupling, allocation)
    with timer("plan"):
        plan = make_plan(allocation)
    if hidden_method == "rotate":
        plan.rotation_report = {"head_untied": untied}  # its vocab x k parameters are in the budget
    check_supported(coupling, plan, reconstruct, reconstruct_mode)
    return plan, coupling


def _plan_widths(model, spec, coupling: CouplingGraph, counter: ParamCounter, scores: dict, options: PruneOptions,
                 allocation: Allocation, removed_layers: list[int], params_before: int, source_hash: str,
                 search_windows: list[torch.Tensor] | None, estimator,
                 calibration: list[torch.Tensor]) -> PrunePlan:
    """The plan for one allocation once the model is scored (and its depth plan made)."""
    ratio, round_to, seed, schedule = options.ratio, options.round_to, options.seed, options.schedule
    reconstruct, reconstruct_mode, depth_metric = options.reconstruct, options.reconstruct_mode, options.depth_metric
    hidden_method = getattr(options, "hidden_method", "select")
    schedule_name, _ = parse_schedule(schedule)
    width_step = allocation.width_step(round_to)
    params_after = counter.count({})
    keep, keep_nested = {}, {}
    if schedule_name != "depth" or abs(1 - params_after / params_before - ratio) > RATIO_TOLERANCE:
        keep, keep_nested, params_after = plan_uniform(
            coupling, counter, scores, ratio, width_step, stock_check(model, spec),
            loss_scaled=estimator.loss_scaled, reference=params_before, allocation=allocation)
    if schedule_name in NONUNIFORM:  # keep the uniform head counts, redistribute the MLP removal over layers
        head_keep = {name: len(units) for name, units in keep.items()
                     if name in {g.name for g in coupling.of_kind(GroupKind.HEADS)}}
        head_keep.update({name: len(rows[0]) for name, rows in keep_nested.items()})
        redistributed = {g.name for g in coupling.groups if g.kind in REDISTRIBUTED}
        fixed = {k: v for k, v in keep.items() if k not in redistributed}  # heads, hidden, experts, vocab
        mlp_keep, params_after = plan_nonuniform(coupling, counter, scores, ratio, width_step, schedule_name,
                                                 {**{k: len(v) for k, v in fixed.items()}, **head_keep},
                                                 params_before)
        keep = {**fixed, **mlp_keep}
    searched = None
    if schedule_name == "search":  # per-layer widths and dropped layers at the uniform plan's budget
        searched = plan_search(model, coupling, counter, scores, SearchInputs(
            keep, keep_nested, params_after, params_before, ratio, width_step), search_windows, allocation,
            stock_check(model, spec), SearchSettings(
                generations=options.search_generations, time_limit_s=options.search_time_s or None,
                drop_chance=LAYER_DROP_CHANCE if getattr(options, "search_layer_drops", False) else 0.0),
            seed, layer_progress("search", options.show_progress, "generation"),
            refit=(RefitSettings(calibration, options.reconstruct_anchor)
                   if options.search_fitness == "refit" else None),
            refit_progress=layer_progress("search statistics", options.show_progress))
        keep, keep_nested, removed_layers = searched.keep, searched.keep_nested, searched.removed_layers
        params_after = searched.params_after
    plan = PrunePlan(model_hash=source_hash, model_type=model.config.model_type, estimator=estimator.name,
                     schedule=f"depth-{depth_metric}" if schedule == "depth" else schedule, seed=seed,
                     ratio_requested=ratio, round_to=round_to, params_before=params_before,
                     params_after=params_after, keep=keep, keep_nested=keep_nested, removed_layers=removed_layers,
                     reconstruct=reconstruct, reconstruct_mode=reconstruct_mode if reconstruct != "none" else "",
                     expert_reconstruct=getattr(options, "expert_reconstruct", "drop"), hidden_method=hidden_method,
                     allocation={k: v for k, v in asdict(allocation).items() if v not in (None, 1)})
    plan.search = searched.record if searched else {}
    return plan


def apply_in_memory(model, coupling: CouplingGraph, plan: PrunePlan, calibration: list[torch.Tensor],
                    options: PruneOptions, timer: "StageTimer", heldout: list[torch.Tensor] | None = None) -> None:
    """One layer-pipeline pass (reconstruction when asked, then each layer's slice step), then the final step."""
    spec = spec_for(model.config.model_type)
    stages = reconstruction_stages(coupling, plan, calibration, options, heldout)
    if coupling.layers_path is not None:
        # the model stays where it is; with a GPU, each decoder layer visits it in turn (a device map has already
        # put every layer on its GPU)
        device = torch.device("cuda") if torch.cuda.is_available() and stages and not is_spread(model) else None
        layer_pass = LayerPipeline(InMemorySource(model, coupling.layers_path, device), stages,
                                   SliceSink(coupling, plan, spec),
                                   progress=layer_progress(f"reconstruct ({options.reconstruct}, {options.reconstruct_mode})",
                                                      options.show_progress and bool(stages)))
        if stages:
            with timer("reconstruct"):
                layer_pass.run(calibration)
            record_reconstruction(plan, stages)
    with timer("apply"):
        if coupling.layers_path is not None and not stages:
            layer_pass.run([])  # no calibration pass: each layer goes straight to its slice step
        finish_plan(model, coupling, plan, spec)
    actual = sum(p.numel() for p in model.parameters())
    if actual != plan.params_after:
        raise RuntimeError(f"internal error: planned {plan.params_after} parameters, model has {actual}")


def apply_rotated(model, coupling: CouplingGraph, plan: PrunePlan, calibration: list[torch.Tensor],
                  options: PruneOptions, timer: "StageTimer", *rest) -> None:
    """--hidden-method rotate: rotate the residual stream into its principal directions and zero the discarded
    ones (recovery/rotation.py), then the usual pass (the reconstruction refits MLP/heads on that stream; the
    hidden slice itself needs no refit) and the norms' sliced-width weight and epsilon."""
    device = torch.device("cuda") if torch.cuda.is_available() else None
    with timer("rotate"):
        roles, report = rotate_residual(model, coupling, plan, calibration, device)
    plan.rotation_report = {**plan.rotation_report, **report.to_dict()}
    apply_in_memory(model, coupling, plan, calibration, options, timer, *rest)  # rest: apply_in_memory's own
    finish_sliced_norms(model, roles, report.kept)


def reconstruction_stages(coupling: CouplingGraph, plan: PrunePlan, calibration: list[torch.Tensor],
                          options: PruneOptions, heldout: list[torch.Tensor] | None = None) -> list:
    """The layer-pipeline stages that refit a layer before its slice step: removed routed experts first (router
    refit / merge, which then masks them out of the routing), then the dense projections' reconstruction, then
    (in memory: `heldout` given, or --cross-block) the block-output errors and the cross-block refit."""
    plan.expert_reconstruct = options.expert_reconstruct
    plan.reconstruct_anchor = options.reconstruct_anchor if options.reconstruct in ("ls", "obs") else 0.0
    experts = prepare_expert_reconstruction(coupling, plan, calibration, options.expert_reconstruct,
                                            sequential=options.reconstruct_mode != "local")
    dense = prepare_reconstruction(coupling, plan, calibration, options.reconstruct, options.reconstruct_mode)
    blocks = None
    if dense is not None and (heldout is not None or getattr(options, "cross_block", 0)):
        blocks = prepare_cross_block(coupling, plan, options.cross_block_settings(), calibration, heldout,
                                     options.reconstruct_mode)
    return [stage for stage in (experts, dense, blocks) if stage is not None]


def record_reconstruction(plan: PrunePlan, stages: list) -> None:
    """What the stages did, into the plan (prune_plan.json) and from there the report."""
    from depgraph_llm.recovery.experts import ExpertReconstruction

    for stage in stages:
        if isinstance(stage, ExpertReconstruction):
            plan.expert_reconstruct_report = stage.report.to_dict()
        elif isinstance(stage, CrossBlock):  # after the dense stage: its errors join that stage's report
            plan.reconstruct_report = {**plan.reconstruct_report, **stage.report.to_dict()}
        else:
            plan.reconstruct_report = stage.report.to_dict()


def layer_progress(description: str, show: bool, unit: str = "layer"):
    """A tqdm factory over layers for the layer pipeline, or None."""
    if not show:
        return None
    from tqdm.auto import tqdm

    return lambda items, total: tqdm(items, total=total, desc=description, unit=unit)
