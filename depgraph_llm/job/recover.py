"""The recover job: a slim checkpoint -> training-based recovery (LoRA / masked / full, optional distillation from
the dense model) -> a slim checkpoint of the same shapes, with a `recovery` section in prune_report.json."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from depgraph_llm.calibration.sources import DEFAULT_EVAL_FILES, default_files, load_text
from depgraph_llm.checkpoint.files import atomic_dir, check_free_space, check_output_dir, weights_hash, write_json
from depgraph_llm.checkpoint.loading import load_config, load_model, resolve_model_path
from depgraph_llm.errors import UserError
from depgraph_llm.evaluation.perplexity import perplexity
from depgraph_llm.models import spec_for
from depgraph_llm.planning.plan import PrunePlan
from depgraph_llm.planning.vocab import restricted_tokenizer
from depgraph_llm.planning.vocab_cost import RestrictedVocabulary
from depgraph_llm.recovery.data import SELF_DATA, load_recovery_data
from depgraph_llm.recovery.distill import DistillSettings, Teacher
from depgraph_llm.recovery.trainers import StepInfo, TrainSettings, get_trainer, train
from depgraph_llm.removal.slim_config import copy_modeling_code, is_heterogeneous

log = logging.getLogger(__name__)
TEACHER_DENSE = "dense"  # the model the checkpoint was pruned from


@dataclass
class RecoverOptions:
    """Everything the recover job needs; `validate()` runs before any work starts."""

    slim: Path | None = None  # the slim checkpoint to recover (a depgraph-llm output folder)
    out: Path | None = None
    trainer: str = "lora"
    data: str | None = None  # file, folder, .json/.jsonl, or "self"; default: default_recovery_source()
    teacher: str | None = None  # "dense" (the source model) or a model folder
    source_model: str | None = None  # the dense model (default: the source named in prune_report.json)
    eval_text: str | None = None  # default: the checkpoint's own evaluation files, else the default licences
    steps: int = 100
    lr: float = 2e-4
    batch_size: int = 4
    seq_len: int = 128
    warmup_steps: int = 10
    seed: int = 0
    checkpoint_every: int = 50
    lora_rank: int = 16
    lora_alpha: int = 32
    masked_lora: bool = False
    distill_weight: float = 1.0
    temperature: float = 1.0
    teacher_topk: int = 0
    teacher_cache: Path | None = None
    self_windows: int = 32
    save_adapter: bool = False
    resume: bool = False
    overwrite: bool = False
    evaluate: bool = True
    eval_seq_len: int | None = None  # None: the protocol of the checkpoint's own report (else 512)
    eval_tokens: int | None = None  # None: likewise (else 4096)
    trust_remote_code: bool = False

    def settings(self) -> TrainSettings:
        distill = (DistillSettings(self.distill_weight, self.temperature, self.teacher_topk,
                                   Path(self.teacher_cache) if self.teacher_cache else None)
                   if self.teacher else None)
        return TrainSettings(steps=self.steps, lr=self.lr, batch_size=self.batch_size, warmup_steps=self.warmup_steps,
                             seed=self.seed, checkpoint_every=self.checkpoint_every, lora_rank=self.lora_rank,
                             lora_alpha=self.lora_alpha, masked_lora=self.masked_lora, distill=distill)

    def output_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.slim).with_name(f"{Path(self.slim).name}-{self.trainer}")

    def validate(self) -> None:
        from depgraph_llm.recovery.trainers.base import TRAINERS

        if self.trainer not in TRAINERS:
            raise UserError(f"--recover {self.trainer!r} is not available; choose one of: {', '.join(sorted(TRAINERS))}")
        if self.seq_len < 2:
            raise UserError(f"--recover-seq-len {self.seq_len} is too small; pass e.g. 256")
        if self.teacher_topk and not self.teacher:
            raise UserError("--teacher-topk needs --teacher")
        self.settings().validate()
        if self.slim is None or not (Path(self.slim) / "config.json").is_file():
            raise UserError(f"{self.slim} is not a checkpoint folder (no config.json); pass a folder written by "
                            "`depgraph-llm prune`")
        check_output_dir(self.output_dir(), self.overwrite, sources=(self.slim, self.source_model))


@dataclass
class RecoverResult:
    out: Path
    report: dict


def state_dir_for(out: Path) -> Path:
    """Where checkpoints of an unfinished run live (beside the output, removed when the run completes)."""
    out = Path(out).resolve()
    return out.parent / f".{out.name}.recover-state"


def check_shapes_match_config(folder: Path) -> None:
    """Refuse a checkpoint whose safetensors shapes differ from what its config.json builds."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    try:
        config = load_config(folder)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 - config validators raise many types
        raise UserError(f"cannot build the model {folder}/config.json describes: {str(exc).splitlines()[0][:160]}; "
                        "fix config.json") from exc
    expected = {n: tuple(t.shape) for n, t in skeleton.state_dict().items()}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                shape = tuple(handle.get_slice(name).get_shape())
                if name in expected and expected[name] != shape:
                    raise UserError(f"{folder}: weight {name} has shape {list(shape)} but config.json describes "
                                    f"{list(expected[name])}; the config does not match the weights: re-run prune "
                                    "or restore the original config.json")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def check_same_tokenizer(student_tokenizer, teacher_dir: Path, teacher_vocab_rows: int, student_vocab_rows: int,
                         kept_vocab: list[int] | None = None) -> None:
    """Distillation compares logits token by token: the teacher must use the same vocabulary, or (a plan that
    pruned the vocabulary) the same vocabulary once restricted to the plan's kept token ids."""
    from transformers import AutoTokenizer

    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    if kept_vocab is not None and teacher_vocab_rows is not None and max(kept_vocab) < teacher_vocab_rows:
        teacher_tokenizer = restricted_tokenizer(teacher_tokenizer, kept_vocab)
        teacher_vocab_rows = len(kept_vocab)
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab() or teacher_vocab_rows != student_vocab_rows:
        raise UserError(f"--teacher {teacher_dir} has a different tokenizer or vocabulary than the checkpoint "
                        f"({len(teacher_tokenizer)} vs {len(student_tokenizer)} tokens); distil from the model it was "
                        "pruned from (--teacher dense)")


def _teacher_loader(teacher_path: Path, trust_remote_code: bool, kept_vocab: list[int] | None) -> Callable:
    """Loads the teacher; for a vocabulary-pruned student, computing logits over the student's kept tokens."""
    def load():
        teacher = load_model(teacher_path, trust_remote_code)[0]
        return teacher if kept_vocab is None else RestrictedVocabulary(teacher, kept_vocab)
    return load


def _config_vocab_rows(folder: Path) -> int | None:
    return _read_json(folder / "config.json").get("vocab_size")


def run_recover(options: RecoverOptions, on_step: Callable[[StepInfo], None] | None = None,
                adapter_base: Path | None = None) -> RecoverResult:
    """Recover a slim checkpoint by training and write the recovered checkpoint atomically to the output folder.

    adapter_base: a slim checkpoint to copy into OUT/adapter/base with --save-adapter (the prune+recover flow,
    whose pre-recovery checkpoint is not kept otherwise)."""
    options.validate()
    slim_dir = Path(options.slim).resolve()
    out = options.output_dir().resolve()
    settings = options.settings()
    check_shapes_match_config(slim_dir)
    slim_report = _read_json(slim_dir / "prune_report.json")
    plan_path = slim_dir / "prune_plan.json"
    plan = PrunePlan.load(plan_path) if plan_path.is_file() else None
    source = options.source_model or (slim_report.get("source") or {}).get("path")
    needs_source = options.trainer == "masked" or options.teacher == TEACHER_DENSE or options.data == SELF_DATA
    if needs_source and not source:
        raise UserError(f"{slim_dir} does not name the model it was pruned from; pass --source-model DENSE_DIR")
    source_path = resolve_model_path(source) if needs_source else None
    if options.trainer == "masked" and plan is None:
        raise UserError(f"--recover masked needs the plan: {plan_path} is missing")
    teacher_path = None
    if options.teacher:
        teacher_path = source_path if options.teacher == TEACHER_DENSE else resolve_model_path(options.teacher)
    eval_files = ([Path(options.eval_text)] if options.eval_text else
                  [Path(f) for f in (slim_report.get("perplexity") or {}).get("files") or []]
                  or default_files(DEFAULT_EVAL_FILES))

    model, tokenizer = load_model(slim_dir, options.trust_remote_code)
    options = _eval_protocol(options, slim_report, model.config)
    rows = model.get_input_embeddings().weight.shape[0]
    kept_vocab = plan.kept_vocabulary() if plan is not None else None
    if teacher_path is not None:
        check_same_tokenizer(tokenizer, teacher_path, _config_vocab_rows(teacher_path), rows, kept_vocab)
    dense = load_model(source_path, options.trust_remote_code)[0] if source_path is not None and (
        options.trainer == "masked" or options.data == SELF_DATA) else None
    data = load_recovery_data(options.data, tokenizer, options.seq_len, eval_files, dense, options.self_windows,
                              options.seed, windows_wanted=options.steps * options.batch_size)
    eval_text = load_text(eval_files) if options.evaluate else None
    check_free_space(out, sum(p.numel() for p in model.parameters()) * 4 * (3 if options.save_adapter else 2))
    params_before = sum(p.numel() for p in model.parameters())
    ppl_before = (perplexity(model, tokenizer, eval_text, options.eval_seq_len, options.eval_tokens, False)
                  if options.evaluate else None)

    adapter_home = out / "adapter" / "base" if adapter_base is not None else slim_dir
    trainer, trained_input = _trainer_for(options, model, dense, plan, source_path, adapter_home)
    teacher = None
    if teacher_path is not None:
        teacher_id = weights_hash(teacher_path)
        if kept_vocab is not None:  # restricted logits: their own top-k cache
            teacher_id = hashlib.sha256(f"{teacher_id}:{kept_vocab}".encode()).hexdigest()
        teacher = Teacher(_teacher_loader(teacher_path, options.trust_remote_code, kept_vocab), settings.distill,
                          teacher_id, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    state_dir = state_dir_for(out)
    began = time.perf_counter()
    trained, result = train(trained_input, trainer, data, settings, state_dir, options.resume, teacher, on_step)
    if not _is_main_process():  # `accelerate launch`: every process trained its shard; one writes the result
        return RecoverResult(out=out, report={})
    with atomic_dir(out, options.overwrite) as tmp:
        if options.save_adapter and trainer.save_adapter(trained, tmp / "adapter") and adapter_base is not None:
            shutil.copytree(adapter_base, tmp / "adapter" / "base",
                            ignore=shutil.ignore_patterns("adapter", "eval_report"))
        recovered = trainer.finish(trained).float().cpu().eval()
        params_after = sum(p.numel() for p in recovered.parameters())
        if params_after != params_before:
            raise RuntimeError(f"internal error: recovery changed the parameter count {params_before} -> {params_after}")
        ppl_after = (perplexity(recovered, tokenizer, eval_text, options.eval_seq_len, options.eval_tokens, False)
                     if options.evaluate else None)
        recovered.save_pretrained(tmp, safe_serialization=True)
        if is_heterogeneous(recovered.config):
            copy_modeling_code(recovered.config, tmp)
        tokenizer.save_pretrained(tmp)
        if plan_path.is_file():
            shutil.copy2(plan_path, tmp / "prune_plan.json")
        report = copy.deepcopy(slim_report)
        report["recovery"] = _recovery_section(options, settings, data, result, teacher_path, ppl_before, ppl_after,
                                               eval_files, slim_dir, time.perf_counter() - began)
        write_json(tmp / "prune_report.json", report)
    shutil.rmtree(state_dir, ignore_errors=True)
    return RecoverResult(out=out, report=report)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _eval_protocol(options: RecoverOptions, slim_report: dict, config) -> RecoverOptions:
    """Perplexity windows as in the checkpoint's own report (so before/after compare), within the model's context."""
    earlier = (slim_report.get("perplexity") or {}).get("after") or {}
    seq_len = options.eval_seq_len or earlier.get("seq_len") or 512
    tokens = options.eval_tokens or earlier.get("tokens") or 4096
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(context, int) and context > 1:
        seq_len = min(seq_len, context)
        if options.seq_len > context:
            options = replace(options, seq_len=context)
    return replace(options, eval_seq_len=seq_len, eval_tokens=tokens)


def _trainer_for(options: RecoverOptions, model, dense, plan, source_path, adapter_base: Path):
    """The trainer and the module it starts from (the slim model, or the masked dense-shaped model)."""
    if options.trainer != "masked":
        kwargs = {"adapter_base": str(adapter_base)} if options.trainer == "lora" else {}
        return get_trainer(options.trainer, **kwargs), model
    from depgraph_llm.job.in_memory import couple_or_explain
    from depgraph_llm.recovery.bias_params import enable_zero_biases
    from depgraph_llm.recovery.trainers.masked import load_slim_into_dense

    if plan.model_hash and weights_hash(source_path) != plan.model_hash:
        raise UserError(f"the plan was made for weights sha256 {plan.model_hash[:12]}..., but {source_path} differs; "
                        "pass the model it was pruned from with --source-model")
    spec = spec_for(dense.config.model_type)
    if plan.reconstruct == "bias":
        enable_zero_biases(dense, spec.bias_switches)
    coupling = couple_or_explain(dense)
    load_slim_into_dense(dense, model, coupling, plan)
    return get_trainer("masked", coupling=coupling, plan=plan, spec=spec), dense


def _recovery_section(options: RecoverOptions, settings: TrainSettings, data, result, teacher_path, ppl_before,
                      ppl_after, eval_files, slim_dir: Path, wall: float) -> dict:
    distill = None
    if settings.distill is not None:
        distill = {"weight": settings.distill.weight, "temperature": settings.distill.temperature,
                   "top_k": settings.distill.top_k or None,
                   "cache": str(settings.distill.cache_dir) if settings.distill.cache_dir else None,
                   "cache_use": result.teacher_cache or None}
    return {
        "trainer": options.trainer + ("+lora" if options.trainer == "masked" and options.masked_lora else ""),
        "from": str(slim_dir), "steps": result.steps, "tokens": result.tokens, "lr": settings.lr,
        "batch_size": settings.batch_size, "seq_len": data.seq_len, "warmup_steps": settings.warmup_steps,
        "seed": settings.seed, "lora": ({"rank": settings.lora_rank, "alpha": settings.lora_alpha}
                                        if options.trainer == "lora" or options.masked_lora else None),
        "teacher": str(teacher_path) if teacher_path else None, "distill": distill,
        "data": data.to_dict(), "loss_curve": result.loss_curve, "train_wall_time_s": result.wall_time_s,
        "wall_time_s": round(wall, 2), "resumed_from_step": result.resumed_from, "device": result.device,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "perplexity": {"protocol": "evaluation/perplexity.py", "files": [str(f) for f in eval_files],
                       "before": ppl_before.to_dict() if ppl_before else None,
                       "after": ppl_after.to_dict() if ppl_after else None},
        "adapter": "adapter/" if options.save_adapter and options.trainer == "lora" else None,
    }


def run_prune_and_recover(prune_options, options: RecoverOptions,
                          on_step: Callable[[StepInfo], None] | None = None):
    """`prune.py ... --recover T`: prune into a hidden stage folder beside --out, recover it into --out, drop the
    stage. With --resume, a complete stage from an interrupted run is reused (pruning is deterministic)."""
    from depgraph_llm.job.options import default_out_dir
    from depgraph_llm.job.prune import run_prune

    if _world_size() > 1:
        raise UserError("prune --recover runs in one process; under `accelerate launch`, prune first, then run "
                        "`depgraph-llm recover DIR`")
    prune_options.validate()
    model_path = resolve_model_path(prune_options.model)
    out = (Path(prune_options.out) if prune_options.out else default_out_dir(model_path, prune_options.ratio)).resolve()
    check_output_dir(out, prune_options.overwrite, sources=(prune_options.model, model_path))
    stage = out.parent / f".{out.name}.pruned"
    teacher = str(model_path) if options.teacher == TEACHER_DENSE else options.teacher
    options = replace(options, slim=stage, out=out, teacher=teacher, source_model=str(model_path),
                      overwrite=prune_options.overwrite, eval_text=options.eval_text or prune_options.eval_text)
    replace(options, slim=model_path).validate()  # flags checked before pruning (the stage may not exist yet)
    pruned = None
    if not (options.resume and (stage / "prune_report.json").is_file()):
        pruned = run_prune(replace(prune_options, out=stage, overwrite=True))
    result = run_recover(options, on_step, adapter_base=stage if options.save_adapter else None)
    shutil.rmtree(stage, ignore_errors=True)
    return pruned, result
