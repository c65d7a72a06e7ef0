"""The prune job: load -> trace/couple -> score -> plan -> apply -> evaluate -> save. One function per stage."""
from __future__ import annotations

import json
import logging
import math
import platform
import resource
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from depgraph_llm.evaluation.perplexity import perplexity
from depgraph_llm.models import nearest_supported, spec_for
from depgraph_llm import __version__
from depgraph_llm.removal.apply import apply_plan, finish_plan, layer_widths, stock_config_accepts
from depgraph_llm.calibration import (CalibrationSource, default_calibration_source, evaluation_text, file_source,
                                      generated_eval_text, self_source, token_windows)
from depgraph_llm.checkpoint.files import (atomic_dir, check_free_space, check_not_source, check_output_dir,
                                          weights_hash, write_json)
from depgraph_llm.graph.coupling import CouplingGraph, build_coupling
from depgraph_llm.errors import UserError
from depgraph_llm.graph.groups import GroupKind
from depgraph_llm.importance import get_estimator, score_groups
from depgraph_llm.importance.base import score_groups_streaming
from depgraph_llm.checkpoint.loading import load_model, resolve_model_path
from depgraph_llm.recovery.bias_params import enable_zero_biases
from depgraph_llm.recovery.reconstruct import METHODS as RECONSTRUCTIONS, MODES as RECONSTRUCT_MODES
from depgraph_llm.recovery.reconstruct import check_supported, prepare_reconstruction
from depgraph_llm.recovery.experts import get_method as get_expert_method, prepare_expert_reconstruction
from depgraph_llm.recovery.rotation import finish_sliced_norms, rotate_residual, untie_head
from depgraph_llm.recovery.cross_block import CrossBlock, CrossBlockSettings, prepare_cross_block
from depgraph_llm.layers import InMemorySource, LayerPipeline
from depgraph_llm.layers.sink import SliceSink
from depgraph_llm.replay import calibration_record, replay_windows
from depgraph_llm.streaming import run_prune_streaming, would_not_fit
from depgraph_llm.stage_memory import peak_rss, reset_peak
from depgraph_llm.planning.plan import PrunePlan
from depgraph_llm.importance.depth import angular_distance, angular_distances, block_influence
from depgraph_llm.planning.schedules import NONUNIFORM, REDISTRIBUTED, plan_nonuniform
from depgraph_llm.planning.search import LAYER_DROP_CHANCE, SearchSettings
from depgraph_llm.planning.search_schedule import SearchInputs, held_aside_windows, plan_search
from depgraph_llm.planning.vocab import kept_token_ids, prune_tokenizer_files
from depgraph_llm.removal.slim_config import copy_modeling_code, is_heterogeneous
from depgraph_llm.planning.experts import moe_report
from depgraph_llm.planning.budget import RATIO_TOLERANCE, Allocation, ParamCounter, Widths, plan_depth, plan_uniform  # noqa: F401

log = logging.getLogger(__name__)


SCHEDULES = ("uniform", "depth", *NONUNIFORM, "layers", "search")


def parse_schedule(schedule: str) -> tuple[str, tuple[int, int] | None]:
    """"layers:A:B" -> ("layers", (A, B)); "layers" -> ("layers", None) (= keep the first and last layer)."""
    name, _, rest = schedule.partition(":")
    if name not in SCHEDULES or (rest and name != "layers"):
        raise UserError(f"--schedule {schedule!r} is not available; choose one of: uniform, global, log-increase, "
                        "depth, layers[:A:B], search")
    if not rest:
        return name, None
    try:
        start, stop = (int(v) for v in rest.split(":"))
    except ValueError:
        raise UserError(f"--schedule {schedule!r}: write the layer range as layers:A:B (prune layers A..B-1)") from None
    if not 0 <= start < stop:
        raise UserError(f"--schedule {schedule!r}: need 0 <= A < B")
    return name, (start, stop)


def allocation_for(options_or_kwargs, layers: int) -> Allocation:
    """The planner's per-kind constraints from the options (layer range defaults to all but first and last)."""
    get = (options_or_kwargs.get if isinstance(options_or_kwargs, dict)
           else lambda k, d=None: getattr(options_or_kwargs, k, d))
    name, layer_range = parse_schedule(get("schedule", "uniform"))
    if name == "layers" and layer_range is None:
        layer_range = (1, layers - 1)
    if layer_range is not None and layer_range[1] > layers:
        raise UserError(f"--schedule layers:{layer_range[0]}:{layer_range[1]}: the model has {layers} layers")
    return Allocation(mlp_ratio=get("mlp_ratio"), head_ratio=get("head_ratio"), hidden_ratio=get("hidden_ratio"),
                      layers_removed=get("layers_removed"), layer_range=layer_range, tp_size=get("tp_size", 1) or 1,
                      experts_keep=get("experts_keep"), expert_ratio=get("expert_ratio"))
DEPTH_METRICS = ("bi", "angular")
HIDDEN_METHODS = ("select", "rotate")


@dataclass
class PruneOptions:
    """Everything the prune job needs; validated by `validate()` before any work starts."""

    model: str | None = None
    ratio: float = 0.25
    out: Path | None = None
    importance: str = "taylor"
    schedule: str = "uniform"
    search_generations: int = SearchSettings.generations  # --schedule search (planning/search.py)
    search_layer_drops: bool = False  # --schedule search may also drop whole layers
    depth_metric: str = "bi"
    mlp_ratio: float | None = None
    head_ratio: float | None = None
    hidden_ratio: float | None = None
    hidden_method: str = "select"  # hidden channels: "select" (by score) or "rotate" (PCA rotation, recovery/rotation.py)
    layers_removed: int | None = None
    experts_keep: int | None = None
    expert_ratio: float | None = None
    tp_size: int = 1
    vocab_keep: int | None = None
    reconstruct: str = "obs"  # best on the benchmark (docs/results/bench-pruning)
    reconstruct_mode: str = "sequential"
    expert_reconstruct: str = "drop"  # after removing routed experts: drop, router (refit), merge (recovery/experts.py)
    calibration: str | None = None
    eval_text: str | None = None
    seed: int = 0
    round_to: int = 8
    calibration_samples: int = 8
    seq_len: int = 512
    eval_seq_len: int = 512
    eval_tokens: int = 4096
    evaluate: bool = True
    dry_run: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False
    show_progress: bool = True
    streaming: bool = False  # one decoder layer in memory at a time (also chosen when the model would not fit)
    dtype: str = "auto"  # what the streamed layers compute in ("auto": the checkpoint's own)
    device: str | None = None  # streamed layers visit this device in turn (e.g. "cuda"); the rest stays on the CPU
    activation_budget_mb: int | None = None  # streamed calibration activations beyond this go to disk
    in_memory: bool = False  # the whole float32 model even when it would not fit (no automatic streaming)
    cross_block: int = 0  # tune this many consecutive layers together against the dense output (recovery/cross_block.py)
    cross_block_epochs: int = 2
    cross_block_lr: float = 1e-5
    cross_block_reg: float = 0.0

    def cross_block_settings(self) -> CrossBlockSettings:
        return CrossBlockSettings(self.cross_block, self.cross_block_epochs, self.cross_block_lr, self.cross_block_reg)

    def validate(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise UserError(f"--ratio {self.ratio} is outside (0, 1); pass the fraction of parameters to remove, e.g. 0.25")
        if self.round_to < 1:
            raise UserError(f"--round-to {self.round_to} must be a positive integer (e.g. 8, 64, 128)")
        for name in ("calibration_samples", "seq_len", "eval_seq_len", "eval_tokens"):
            if getattr(self, name) < 1 or (name.endswith("seq_len") and getattr(self, name) < 2):
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} is too small; pass a positive value")
        get_estimator(self.importance)
        for name in ("mlp_ratio", "head_ratio", "hidden_ratio", "expert_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise UserError(f"--{name.replace('_', '-')} {value} is outside [0, 1); pass the fraction to remove")
        if self.layers_removed is not None and self.layers_removed < 1:
            raise UserError(f"--layers-removed {self.layers_removed} must be a positive number of layers")
        if self.vocab_keep is not None and self.vocab_keep < 1:
            raise UserError(f"--vocab-keep {self.vocab_keep} must be a positive number of tokens")
        if self.tp_size < 1:
            raise UserError(f"--tp-size {self.tp_size} must be a positive integer")
        if self.hidden_method not in HIDDEN_METHODS:
            raise UserError(f"--hidden-method {self.hidden_method!r} is not available; choose one of: "
                            f"{', '.join(HIDDEN_METHODS)}")
        if self.hidden_method == "rotate" and not self.hidden_ratio:
            raise UserError("--hidden-method rotate slices the rotated hidden dimension; add --hidden-ratio R")
        if self.hidden_method == "rotate" and (self.streaming or self.device is not None):
            raise UserError("--hidden-method rotate runs on the in-memory path; drop --streaming / --device")
        if self.hidden_ratio and self.reconstruct != "none" and self.hidden_method != "rotate":
            raise UserError("--hidden-ratio changes every layer's inputs, which reconstruction cannot follow; "
                            "add --reconstruct none, or --hidden-method rotate")
        parse_schedule(self.schedule)
        if self.search_generations < 0:
            raise UserError(f"--search-generations {self.search_generations} must be 0 or more")
        get_expert_method(self.expert_reconstruct)
        if self.hidden_ratio and self.expert_reconstruct != "drop":
            raise UserError(f"--hidden-ratio changes the routers' inputs, which --expert-reconstruct "
                            f"{self.expert_reconstruct} cannot follow; add --expert-reconstruct drop")
        if self.reconstruct not in RECONSTRUCTIONS:
            raise UserError(f"--reconstruct {self.reconstruct!r} is not available; choose one of: "
                            f"{', '.join(RECONSTRUCTIONS)}")
        if self.reconstruct_mode not in RECONSTRUCT_MODES:
            raise UserError(f"--reconstruct-mode {self.reconstruct_mode!r} is not available; choose one of: "
                            f"{', '.join(RECONSTRUCT_MODES)}")
        self.cross_block_settings().validate()
        if self.cross_block and self.reconstruct == "none":
            raise UserError("--cross-block tunes blocks after the closed-form reconstruction; pass --reconstruct "
                            "obs|ls|bias, or drop --cross-block")
        if self.cross_block and self.reconstruct_mode != "sequential":
            raise UserError(f"--cross-block tunes blocks on the pruned model's stream; use --reconstruct-mode "
                            f"sequential (not {self.reconstruct_mode})")
        if self.cross_block and self.hidden_ratio:
            raise UserError("--cross-block does not keep removed hidden channels at zero yet; drop --cross-block "
                            "or --hidden-ratio")
        if self.depth_metric not in DEPTH_METRICS:
            raise UserError(f"--depth-metric {self.depth_metric!r} is not available; choose one of: "
                            f"{', '.join(DEPTH_METRICS)}")
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except RuntimeError:
                raise UserError(f"--device {self.device!r} is not a device; pass cpu or cuda (cuda:N)") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise UserError(f"--device {self.device}: no CUDA GPU is visible; leave --device out to run on the CPU")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserError(f"--dtype {self.dtype!r} is not available; choose one of: auto, float32, bfloat16, float16")
        if self.out is not None:
            check_output_dir(Path(self.out), self.overwrite)


@dataclass
class PruneResult:
    out: Path
    report: dict
    plan: PrunePlan
    timings: dict[str, float] = field(default_factory=dict)


class _Timer:
    """Wall time and peak RSS of each stage (`with timer("name"): ...`)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.peaks: dict[str, int] = {}

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                reset_peak()
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.times[name] = round(time.perf_counter() - self.start, 3)
                timer.peaks[name] = max(timer.peaks.get(name, 0), peak_rss())

        return _Span()


def default_out_dir(model_path: Path, ratio: float) -> Path:
    return Path.cwd() / f"{model_path.name}-pruned-{ratio:g}"


SELF_CALIBRATION = "self"


def _texts(options: PruneOptions) -> tuple[CalibrationSource, str | None, list[str], list[str]]:
    """Calibration source, evaluation text (None: none present, generate it) and the files they came from.
    The defaults are disjoint: calibration parts of calibration.DEFAULT_MIX, an evaluation part (corpora.py)."""
    eval_text, eval_files = evaluation_text(options.eval_text)
    eval_files = eval_files or [SELF_CALIBRATION]
    if options.calibration == SELF_CALIBRATION:
        source = self_source()
    else:
        source = file_source(Path(options.calibration)) if options.calibration else default_calibration_source()
    cal_files = [f for part in source.parts for f in part.files] or [SELF_CALIBRATION]
    return source, eval_text, cal_files, eval_files


def calibration_batches(model, tokenizer, source: CalibrationSource, options: PruneOptions) -> list[torch.Tensor]:
    """Token windows drawn from the calibration source (or sampled from the dense model for a self source)."""
    return source.windows(model, tokenizer, options.seq_len, options.calibration_samples, options.seed,
                          options.show_progress)


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


def fit_windows_to_context(options: PruneOptions, config) -> PruneOptions:
    """Calibration and evaluation windows no longer than the model's context (learned position tables, e.g.
    GPT-2's n_positions, cannot index past it)."""
    context = next((v for v in (getattr(config, f, None) for f in ("max_position_embeddings", "n_positions", "n_ctx"))
                    if isinstance(v, int) and v > 1), None)
    if context is None or (options.seq_len <= context and options.eval_seq_len <= context):
        return options
    log.warning("the model's context is %d tokens: calibration and evaluation windows shortened to it", context)
    return replace(options, seq_len=min(options.seq_len, context), eval_seq_len=min(options.eval_seq_len, context))


def run_prune(options: PruneOptions) -> PruneResult:
    """Prune a model end to end and save the slim checkpoint with its plan and report."""
    options.validate()
    timer = _Timer()
    model_path = resolve_model_path(options.model)
    out = Path(options.out) if options.out else default_out_dir(model_path, options.ratio)
    check_output_dir(out, options.overwrite, sources=(options.model, model_path))
    if options.in_memory and (options.streaming or options.device is not None):
        raise UserError("--in-memory loads the whole model; it cannot be combined with --streaming or --device")
    if options.streaming or options.device is not None or (not options.in_memory and would_not_fit(model_path)):
        if options.hidden_method == "rotate":
            raise UserError(f"--hidden-method rotate runs on the in-memory path, but {model_path} would not fit; "
                            "use --hidden-method select, or --in-memory")
        if options.cross_block:
            raise UserError("--cross-block tunes layers the streaming pass has already written; it needs the "
                            "model in memory (drop --streaming/--device, or add --in-memory)")
        if not options.streaming:
            log.warning("%s would not fit in memory in float32: pruning it one decoder layer at a time (streaming)",
                        model_path)
        return run_prune_streaming(options, model_path, out, timer)
    with timer("load"):
        model, tokenizer = load_model(model_path, options.trust_remote_code)
        source_hash = weights_hash(model_path)
    options = fit_windows_to_context(options, model.config)
    estimator = get_estimator(options.importance)
    cal_source, eval_text, cal_files, eval_files = _texts(options)
    if eval_text is None and (options.evaluate or options.dry_run):
        eval_text = generated_eval_text(model, tokenizer, options.eval_seq_len, options.eval_tokens, options.seed)
    cal_text = cal_source.text()
    needs_calibration = (options.vocab_keep is not None and cal_source.is_self
                         or estimator.needs_gradients or estimator.needs_calibration or options.schedule == "depth"
                         or options.reconstruct != "none" or options.layers_removed is not None
                         or options.expert_reconstruct != "drop" or options.hidden_method == "rotate")
    with timer("calibration"):
        calibration = calibration_batches(model, tokenizer, cal_source, options) if needs_calibration else []
    params_before = sum(p.numel() for p in model.parameters())
    allocation = allocation_for(options, getattr(model.config, spec_for(model.config.model_type).layers_field))
    if options.vocab_keep:
        allocation = replace(allocation, vocab_ids=tuple(_vocab_ids(model, tokenizer, cal_text, calibration, options)))
    ppl_before = None
    if options.evaluate and not options.dry_run:
        with timer("perplexity_before"):
            ppl_before = perplexity(model, tokenizer, eval_text, options.eval_seq_len, options.eval_tokens,
                                    options.show_progress)
    search_windows = (held_aside_windows(cal_source, model, tokenizer, calibration, options.seq_len, options.seed,
                                         SearchSettings()) if options.schedule == "search" else None)
    if options.dry_run:
        plan, coupling = prune_in_memory(model, calibration, options, source_hash=source_hash, timer=timer,
                                         apply=False, allocation=allocation,
                                         search_windows=search_windows)
        report = plan_report(model_path, source_hash, coupling, plan, timer)
        report["dry_run"] = True
        report["estimated_checkpoint_bytes"] = plan.params_after * 4
        report["estimated_remaining_s"] = round(_remaining_time(model, tokenizer, eval_text, options, plan), 1)
        return PruneResult(out=out, report=report, plan=plan, timings=timer.times)
    check_free_space(out, params_before * 4)
    heldout = heldout_windows(tokenizer, eval_text, calibration, options)
    plan, coupling = prune_in_memory(model, calibration, options, source_hash=source_hash, timer=timer,
                                     allocation=allocation, heldout=heldout, search_windows=search_windows)
    plan.calibration = calibration_record(cal_source, calibration, options.seq_len, options.seed) if calibration else {}
    tokenizer = pruned_tokenizer(tokenizer, plan)
    ppl_after = None
    if options.evaluate:
        with timer("perplexity_after"):
            ppl_after = perplexity(model, tokenizer, eval_text, options.eval_seq_len, options.eval_tokens,
                                   options.show_progress)
    report = plan_report(model_path, source_hash, coupling, plan, timer)
    report["calibration"] = {"files": cal_files, "samples": len(calibration), "seq_len": options.seq_len,
                             "source": cal_source.record(options.seq_len, len(calibration), options.seed)}
    report["perplexity"] = {"protocol": "evaluation/perplexity.py", "files": eval_files,
                            "before": ppl_before.to_dict() if ppl_before else None,
                            "after": ppl_after.to_dict() if ppl_after else None}
    if vocab_keep(plan) is not None:
        report["perplexity"]["note"] = ("after: per token of the pruned tokenizer, which may split the evaluation "
                                        "text into more tokens than the source tokenizer; not strictly comparable")
    with timer("save"):
        save_checkpoint(model, tokenizer, out, plan, report, options.overwrite, source_dtype(model_path))
    report["timings_s"] = timer.times
    return PruneResult(out=out, report=report, plan=plan, timings=timer.times)


def heldout_windows(tokenizer, eval_text: str | None, calibration: list[torch.Tensor],
                    options: PruneOptions) -> list[torch.Tensor]:
    """Windows of the evaluation text, as many and as long as the calibration ones, on which the reconstruction
    pass measures its block-output error without fitting on them (none without reconstruction or text)."""
    if options.reconstruct == "none" or not eval_text or not calibration:
        return []
    return token_windows(tokenizer, eval_text, calibration[0].shape[-1], len(calibration), purpose="held-out")


def _vocab_ids(model, tokenizer, cal_text: str | None, calibration: list[torch.Tensor],
               options: PruneOptions) -> list[int]:
    """Token ids --vocab-keep keeps, counted on the whole calibration corpus (or the self-generated windows)."""
    if cal_text is not None:
        ids = tokenizer(cal_text, add_special_tokens=False).input_ids
    else:
        ids = [int(t) for window in calibration for t in window.flatten()]
    rows = model.get_input_embeddings().weight.shape[0]
    return kept_token_ids(tokenizer, Counter(ids), options.vocab_keep, rows)


def plan_report(model_path: Path, source_hash: str, coupling: CouplingGraph, plan: PrunePlan, timer: _Timer) -> dict:
    """The part of prune_report.json that every job writes: source, plan summary, widths, timings, memory."""
    return {
        "tool": {"name": "depgraph-llm", "version": __version__, "torch": torch.__version__,
                 "python": platform.python_version()},
        "source": {"path": str(model_path), "weights_sha256": source_hash, "model_type": plan.model_type},
        "importance": plan.estimator, "chosen_by": plan.chosen_by_kind(coupling), "schedule": plan.schedule,
        "seed": plan.seed, "round_to": plan.round_to,
        "reconstruct": plan.reconstruct if plan.reconstruct == "none" else f"{plan.reconstruct} ({plan.reconstruct_mode})",
        "reconstruct_report": plan.reconstruct_report,
        "expert_reconstruct": plan.expert_reconstruct,
        **({"hidden_method": plan.hidden_method, "rotation_report": plan.rotation_report}
           if plan.hidden_method != "select" else {}),
        **({"expert_reconstruct_report": plan.expert_reconstruct_report} if plan.expert_reconstruct_report else {}),
        "params_before": plan.params_before, "params_after": plan.params_after,
        "ratio_requested": plan.ratio_requested, "ratio_achieved": round(plan.ratio_achieved, 6),
        "layer_widths_before": layer_widths(coupling), "layer_widths_after": layer_widths(coupling, plan),
        **moe_report(coupling, plan),
        "timings_s": timer.times,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_by_stage_bytes": dict(timer.peaks),
    }


def _depth_plan(model, coupling: CouplingGraph, counter: ParamCounter, calibration: list[torch.Tensor], ratio: float,
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
                    timer: "_Timer | None" = None, apply: bool = True,
                    search_windows: list[torch.Tensor] | None = None,
                    allocation: Allocation | None = None,
                    heldout: list[torch.Tensor] | None = None) -> tuple[PrunePlan, "CouplingGraph"]:
    """Trace, score, plan and physically prune `model` in place; returns the plan and coupling.

    Reads from `options`: importance, ratio, round_to, seed, schedule, depth_metric, reconstruct,
    reconstruct_mode, show_progress (and the per-kind ratios when no `allocation` is given).
    schedule "uniform": same widths in every layer. "depth": remove whole decoder layers (Block Influence or
    angular distance on the calibration batches) and trim the rest uniformly to land on the exact ratio.
    reconstruct "ls"/"bias"/"obs": refit the layers that lose input channels on the calibration batches
    (recovery/reconstruct.py); "bias" first gives the model zero biases through its config switches, so the
    planner counts them. Applying is one layer-pipeline pass (reconstruct, then slice each layer) and a final
    config step."""
    timer = timer or _Timer()
    plan, coupling = plan_in_memory(model, calibration, options, source_hash, timer, allocation,
                                    search_windows=search_windows)
    if apply:
        (apply_rotated if plan.hidden_method == "rotate" else apply_in_memory)(model, coupling, plan, calibration,
                                                                               options, timer, heldout)
    return plan, coupling


def plan_in_memory(model, calibration: list[torch.Tensor], options: PruneOptions, source_hash: str, timer: "_Timer",
                   allocation: Allocation | None = None, source=None,
                   search_windows: list[torch.Tensor] | None = None) -> tuple[PrunePlan, CouplingGraph]:
    """Trace, score and plan (the model is unchanged, except for the zero biases of --reconstruct bias); with a
    streaming `source`, `model` is its skeleton and every pass visits the layers one at a time."""
    estimator = get_estimator(options.importance)
    ratio, round_to, seed, schedule = options.ratio, options.round_to, options.seed, options.schedule
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
    torch.manual_seed(seed)
    with timer("importance"):
        scores = (score_groups(model, coupling.groups, estimator, lambda: calibration, options.show_progress)
                  if source is None else
                  score_groups_streaming(source, coupling.groups, estimator, calibration, options.show_progress))
    counter = ParamCounter({name: tuple(p.shape) for name, p in model.named_parameters()}, coupling)
    layer_count = len(coupling.of_kind(GroupKind.LAYER))
    allocation = allocation or allocation_for(options, layer_count)
    schedule_name, _ = parse_schedule(schedule)
    width_step = math.lcm(max(1, round_to), allocation.tp_size)
    removed_layers: list[int] = []
    if schedule_name == "depth" or allocation.layers_removed:
        with timer("depth_importance"):
            removed_layers = _depth_plan(model, coupling, counter, calibration, ratio, depth_metric,
                                         allocation.layers_removed, source)
        counter = counter.without_layers(frozenset(removed_layers))
    with timer("plan"):
        params_after = counter.count({})
        keep, keep_nested = {}, {}
        if schedule_name != "depth" or abs(1 - params_after / params_before - ratio) > RATIO_TOLERANCE:
            keep, keep_nested, params_after = plan_uniform(
                coupling, counter, scores, ratio, width_step, lambda w: config_accepts(model, spec, w),
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
                lambda w: config_accepts(model, spec, w), SearchSettings(
                    generations=options.search_generations,
                    drop_chance=LAYER_DROP_CHANCE if getattr(options, "search_layer_drops", False) else 0.0),
                seed, _progress("search", options.show_progress, "generation"))
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
    if hidden_method == "rotate":
        plan.rotation_report = {"head_untied": untied}  # its vocab x k parameters are in the budget
    check_supported(coupling, plan, reconstruct, reconstruct_mode)
    return plan, coupling


def apply_in_memory(model, coupling: CouplingGraph, plan: PrunePlan, calibration: list[torch.Tensor],
                    options: PruneOptions, timer: "_Timer", heldout: list[torch.Tensor] | None = None) -> None:
    """One layer-pipeline pass (reconstruction when asked, then each layer's slice step), then the final step."""
    spec = spec_for(model.config.model_type)
    stages = reconstruction_stages(coupling, plan, calibration, options, heldout)
    if coupling.layers_path is not None:
        # the model stays where it is; with a GPU, each decoder layer visits it in turn
        device = torch.device("cuda") if torch.cuda.is_available() and stages else None
        layer_pass = LayerPipeline(InMemorySource(model, coupling.layers_path, device), stages,
                                   SliceSink(coupling, plan, spec),
                                   progress=_progress(f"reconstruct ({options.reconstruct}, {options.reconstruct_mode})",
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
                  options: PruneOptions, timer: "_Timer", *rest) -> None:
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


def _progress(description: str, show: bool, unit: str = "layer"):
    """A tqdm factory over layers for the layer pipeline, or None."""
    if not show:
        return None
    from tqdm.auto import tqdm

    return lambda items, total: tqdm(items, total=total, desc=description, unit=unit)


def _remaining_time(model, tokenizer, eval_text: str, options: PruneOptions, plan: PrunePlan) -> float:
    """Rough time a real run adds after planning: two perplexity passes (timed on one window) and the save."""
    seconds = plan.params_after * 4 / 200e6  # writing safetensors at ~200 MB/s
    if options.evaluate:
        window = token_windows(tokenizer, eval_text, options.eval_seq_len, 1, purpose="evaluation")[0]
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=window, use_cache=False)
        windows = max(1, options.eval_tokens // options.eval_seq_len)
        seconds += (time.perf_counter() - start) * windows * (1 + plan.params_after / plan.params_before)
    return seconds


def run_apply(plan_path: Path, model: str | None, out: Path, overwrite: bool = False,
              trust_remote_code: bool = False) -> PruneResult:
    """Replay a saved prune plan on the model it was made from (checked by weights hash); a reconstructed plan
    draws its calibration windows again from its record (checked by digest) and refits the same way."""
    plan = PrunePlan.load(plan_path)
    if plan.hidden_method == "rotate":
        raise UserError(f"{plan_path} used --hidden-method rotate, whose rotation comes from calibration data; "
                        "rerun `prune` with the same options instead of `apply`")
    if plan.expert_reconstruct != "drop":
        raise UserError(f"{plan_path} used --expert-reconstruct {plan.expert_reconstruct}, whose refitted routers "
                        "depend on calibration data; rerun `prune` with the same options instead of `apply`")
    check_output_dir(out, overwrite)
    timer = _Timer()
    model_path = resolve_model_path(model)
    check_not_source(out, (model, model_path, plan_path))
    source_hash = weights_hash(model_path)
    if plan.model_hash != source_hash:
        raise UserError(f"{plan_path} was made for weights sha256 {plan.model_hash[:12]}..., but {model_path} has "
                        f"{source_hash[:12]}...; pass the model the plan was made from")
    with timer("load"):
        loaded, tokenizer = load_model(model_path, trust_remote_code)
    if sum(p.numel() for p in loaded.parameters()) != plan.params_before:
        raise UserError(f"{plan_path} expects {plan.params_before} parameters before pruning; the model differs")
    check_free_space(out, plan.params_after * 4)
    spec = spec_for(loaded.config.model_type)
    calibration = []
    if plan.reconstruct != "none":
        with timer("calibration"):
            calibration = replay_windows(plan.calibration, loaded, tokenizer)
        if plan.reconstruct == "bias":
            enable_zero_biases(loaded, spec.bias_switches)
    coupling = couple_or_explain(loaded)
    plan.check_against(coupling, loaded.config.model_type)
    if calibration:
        recorded = json.dumps([plan.keep, plan.keep_nested], sort_keys=True)
        options = PruneOptions(model=str(model_path), ratio=plan.ratio_requested, reconstruct=plan.reconstruct,
                               reconstruct_mode=plan.reconstruct_mode, show_progress=False,
                               **replayed_cross_block(plan))
        try:
            apply_in_memory(loaded, coupling, plan, calibration, options, timer)
        except RuntimeError as exc:  # the parameter count check inside: an edited plan
            raise UserError(f"{plan_path} says params_after {plan.params_after}, replaying it gives another count; "
                            "the plan was edited or made by another version, recreate it with `prune`") from exc
        if json.dumps([plan.keep, plan.keep_nested], sort_keys=True) != recorded:
            raise UserError(f"replaying {plan_path} chose other units than it records (another torch version or "
                            "thread count changes the refit's arithmetic); rerun `prune` instead of `apply`")
    else:
        with timer("apply"):
            apply_plan(loaded, coupling, plan, spec)
    tokenizer = pruned_tokenizer(tokenizer, plan)
    replayed = sum(p.numel() for p in loaded.parameters())
    if replayed != plan.params_after:
        raise UserError(f"{plan_path} says params_after {plan.params_after}, replaying it gives {replayed}; "
                        "the plan was edited or made by another version, recreate it with `prune`")
    report = plan_report(model_path, source_hash, coupling, plan, timer)
    report["replayed_from"] = str(plan_path)
    with timer("save"):
        save_checkpoint(loaded, tokenizer, out, plan, report, overwrite, source_dtype(model_path))
    return PruneResult(out=out, report=report, plan=plan, timings=timer.times)


def replayed_cross_block(plan: PrunePlan) -> dict:
    """The PruneOptions fields of the cross-block refit a plan records (none when it had none)."""
    record = plan.reconstruct_report.get("cross_block") or {}
    names = {"window": "cross_block", "epochs": "cross_block_epochs", "lr": "cross_block_lr", "reg": "cross_block_reg"}
    return {field_name: record[key] for key, field_name in names.items() if key in record}


def vocab_keep(plan: PrunePlan) -> list[int] | None:
    """The token ids a plan keeps, if it prunes the vocabulary."""
    vocab = [ids for name, ids in plan.keep.items() if name.endswith(".vocab")]
    return vocab[0] if vocab else None


def pruned_tokenizer(tokenizer, plan: PrunePlan):
    """The tokenizer for the pruned model: itself, or (vocabulary pruning) a copy limited to the kept ids."""
    kept = vocab_keep(plan)
    if kept is None:
        return tokenizer
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        prune_tokenizer_files(Path(folder), kept)
        return AutoTokenizer.from_pretrained(folder)


def source_dtype(model_path: Path) -> torch.dtype:
    """The dtype a checkpoint stores its floating-point weights in (the output keeps it)."""
    from depgraph_llm.checkpoint.shards import ShardReader

    try:
        return ShardReader(model_path).dtype()
    except UserError:
        return torch.float32


def save_checkpoint(model, tokenizer, out: Path, plan: PrunePlan, report: dict, overwrite: bool,
                    dtype: torch.dtype | None = None) -> None:
    """Write model (safetensors), config, tokenizer, prune_plan.json and prune_report.json atomically; with
    `dtype` (the source checkpoint's), the weights are stored in it rather than in the float32 they were pruned in."""
    if dtype is not None and dtype != torch.float32:
        model.to(dtype)
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if is_heterogeneous(model.config):
            copy_modeling_code(model.config, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "prune_plan.json").write_text(plan.to_json() + "\n")
        write_json(tmp / "prune_report.json", report)
