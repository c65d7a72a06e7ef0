"""What a prune job is asked to do (PruneOptions, validated before any work) and what it returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from depgraph_llm.calibration import DEFAULT_CALIBRATION_SAMPLES
from depgraph_llm.checkpoint.files import check_output_dir
from depgraph_llm.checkpoint.device_map import parse_device_map
from depgraph_llm.errors import UserError
from depgraph_llm.importance import get_estimator
from depgraph_llm.planning.budget import Allocation
from depgraph_llm.planning.plan import PrunePlan
from depgraph_llm.planning.schedules import NONUNIFORM
from depgraph_llm.planning.search import SearchSettings
from depgraph_llm.planning.vocab_cost import AUTO_VOCAB
from depgraph_llm.recovery.cross_block import CrossBlockSettings
from depgraph_llm.recovery.experts import get_method as get_expert_method
from depgraph_llm.recovery.reconstruct import METHODS as RECONSTRUCTIONS
from depgraph_llm.recovery.reconstruct import MODES as RECONSTRUCT_MODES

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
SEARCH_FITNESSES = ("masked", "refit")  # planning/fitness.py, planning/refit_fitness.py


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
    search_time_s: float = SearchSettings.time_limit_s  # --schedule search: no generation after this (0: no limit)
    search_fitness: str = "masked"  # --schedule search: masked, or refit (planning/refit_fitness.py)
    depth_metric: str = "bi"
    mlp_ratio: float | None = None
    head_ratio: float | None = None
    hidden_ratio: float | None = None
    hidden_method: str = "select"  # hidden channels: "select" (by score) or "rotate" (PCA rotation, recovery/rotation.py)
    layers_removed: int | None = None
    experts_keep: int | None = None
    expert_ratio: float | None = None
    tp_size: int = 1
    vocab_keep: int | str | None = None  # a number of tokens, or "auto" (planning/vocab_cost.py)
    reconstruct: str = "obs"  # best on the benchmark (docs/results/bench-pruning)
    reconstruct_mode: str = "sequential"
    reconstruct_anchor: float = 0.1  # ls/obs refit pulled toward the original weights (recovery/solvers.py)
    expert_reconstruct: str = "drop"  # after removing routed experts: drop, router (refit), merge (recovery/experts.py)
    calibration: str | None = None
    eval_text: str | None = None
    seed: int = 0
    round_to: int = 8
    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES
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
    device_map: str | None = None  # the whole model spread over GPUs by accelerate (checkpoint/device_map.py)
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
        if self.vocab_keep is not None and self.vocab_keep != AUTO_VOCAB and (
                not isinstance(self.vocab_keep, int) or self.vocab_keep < 1):
            raise UserError(f"--vocab-keep {self.vocab_keep} must be a positive number of tokens or '{AUTO_VOCAB}'")
        if self.vocab_keep == AUTO_VOCAB and (self.schedule.startswith("search") or self.hidden_method == "rotate"):
            raise UserError("--vocab-keep auto plans and applies every candidate size, which --schedule search and "
                            "--hidden-method rotate would repeat each time; pass a number of tokens (--vocab-keep N)")
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
        if not self.reconstruct_anchor >= 0:
            raise UserError(f"--reconstruct-anchor {self.reconstruct_anchor} must be 0 (plain least squares) or more")
        if self.search_fitness not in SEARCH_FITNESSES:
            raise UserError(f"--search-fitness {self.search_fitness!r} is not available; choose one of: "
                            f"{', '.join(SEARCH_FITNESSES)}")
        if self.search_fitness == "refit" and self.reconstruct not in ("obs", "ls"):
            raise UserError(f"--search-fitness refit scores candidates as the least-squares refit leaves them, "
                            f"which --reconstruct {self.reconstruct} does not do; use --reconstruct obs or ls, or "
                            "--search-fitness masked")
        if not self.search_time_s >= 0:
            raise UserError(f"--search-time {self.search_time_s} must be 0 (no limit) or a number of seconds")
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
        if self.device_map is not None:
            if self.streaming or self.device is not None:
                raise UserError("--device-map places the whole model on the GPUs; it cannot be combined with "
                                "--streaming or --device (one layer at a time on one GPU)")
            if self.hidden_method == "rotate":
                raise UserError("--hidden-method rotate folds one rotation into every layer on one device; drop "
                                "--device-map")
            parse_device_map(self.device_map)
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


def default_out_dir(model_path: Path, ratio: float) -> Path:
    return Path.cwd() / f"{model_path.name}-pruned-{ratio:g}"
