"""The trainer registry and the one training loop every trainer shares (built on `accelerate`: CPU, one GPU or
several with `accelerate launch`), with checkpoints every K steps and an exact resume."""
from __future__ import annotations

import logging
import math
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from depgraph_llm.errors import UserError
from depgraph_llm.recovery.data import RecoveryData, batch_indices
from depgraph_llm.recovery.distill import DistillSettings, Teacher, lm_loss, mixed_loss

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"


@dataclass
class TrainSettings:
    """Hyper-parameters of one recovery run (every trainer reads the ones it needs)."""

    steps: int = 100
    lr: float = 2e-4
    batch_size: int = 4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50  # 0: no checkpoints (no --resume)
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    masked_lora: bool = False  # masked trainer: train LoRA adapters (masked too) instead of all weights
    gradient_checkpointing: bool | None = None  # None: on with a GPU
    bf16: bool | None = None  # None: bf16 autocast with a GPU
    distill: DistillSettings | None = None

    def validate(self) -> None:
        for name in ("steps", "batch_size", "lora_rank"):
            if getattr(self, name) < 1:
                raise UserError(f"--recover-{name.replace('_', '-')} {getattr(self, name)} must be a positive integer")
        if not self.lr > 0:
            raise UserError(f"--recover-lr {self.lr} must be positive, e.g. 2e-4")
        if self.checkpoint_every < 0 or self.warmup_steps < 0:
            raise UserError("--checkpoint-every and --warmup-steps must be >= 0")
        if self.distill is not None:
            if not 0.0 <= self.distill.weight <= 1.0:
                raise UserError(f"--distill-weight {self.distill.weight} is outside [0, 1]")
            if not self.distill.temperature > 0:
                raise UserError(f"--temperature {self.distill.temperature} must be positive")
            if self.distill.top_k < 0:
                raise UserError(f"--teacher-topk {self.distill.top_k} must be >= 0 (0 = full logits)")

    def fingerprint(self) -> dict:
        """What a resumed run must share with the run that wrote the checkpoint."""
        data = asdict(self)
        data.pop("checkpoint_every")
        if data["distill"]:
            data["distill"]["cache_dir"] = None
        return data


@dataclass
class StepInfo:
    """What the progress callback sees after each optimizer step."""

    step: int
    steps: int
    loss: float
    tokens: int
    tokens_per_s: float
    model: nn.Module | None = field(default=None, repr=False)  # the module being trained (evaluate it in eval mode)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    loss_curve: list[list[float]]
    wall_time_s: float
    resumed_from: int | None = None
    device: str = "cpu"
    teacher_cache: dict = field(default_factory=dict)


class Trainer(ABC):
    """One recovery method: what to train and how to turn the trained model back into a slim model."""

    name: str = ""

    @abstractmethod
    def prepare(self, model: nn.Module, settings: TrainSettings) -> nn.Module:
        """The module to train (the slim model itself, a peft wrapper, or a masked dense model)."""

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step (the masked trainer re-zeroes its masks)."""

    @abstractmethod
    def finish(self, model: nn.Module) -> nn.Module:
        """The trained slim model (LoRA merged, masks physically removed)."""

    def save_adapter(self, model: nn.Module, folder: Path) -> bool:
        """Write an adapter folder, if this trainer has one; True if written."""
        return False


TRAINERS: dict[str, Callable[..., Trainer]] = {}


def register(name: str):
    """Class decorator: make a trainer available as --recover NAME."""
    def wrap(cls):
        cls.name = name
        TRAINERS[name] = cls
        return cls
    return wrap


def get_trainer(name: str, **kwargs) -> Trainer:
    from depgraph_llm.recovery import trainers  # noqa: F401 - fills the registry

    if name not in TRAINERS:
        raise UserError(f"--recover {name!r} is not available; choose one of: {', '.join(sorted(TRAINERS))}")
    return TRAINERS[name](**kwargs)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to the peak, then cosine decay to 10% of it."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(state_dir: Path) -> Path | None:
    """The newest complete step-* folder under `state_dir`."""
    if not state_dir.is_dir():
        return None
    done = sorted(p for p in state_dir.glob("step-*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def _save_state(state_dir: Path, step: int, model: nn.Module, optimizer, scheduler, extra: dict) -> None:
    """Write step-N/state.pt atomically (temp folder, rename) and drop older checkpoints."""
    target = state_dir / f"step-{step:07d}"
    tmp = state_dir / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"step": step, "trainable": {n: p.detach().cpu() for n, p in trainable_parameters(model).items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                **extra}, tmp / STATE_FILE)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    for old in state_dir.glob("step-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)


def _load_state(path: Path, model: nn.Module, optimizer, scheduler, fingerprint: dict) -> dict:
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    if state.get("fingerprint") != fingerprint:
        raise UserError(f"the checkpoint in {path.parent} was written by a run with other settings or data; "
                        "rerun with the same flags, or without --resume to start over")
    params = trainable_parameters(model)
    if set(params) != set(state["trainable"]):
        raise UserError(f"the checkpoint in {path.parent} holds other trainable weights; rerun without --resume")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state


def train(model: nn.Module, trainer: Trainer, data: RecoveryData, settings: TrainSettings,
          state_dir: Path | None = None, resume: bool = False, teacher: Teacher | None = None,
          on_step: Callable[[StepInfo], None] | None = None, accelerator=None) -> tuple[nn.Module, TrainResult]:
    """Train with `trainer` on `data` for `settings.steps` optimizer steps.

    Returns the trained module as the trainer built it (call `trainer.finish` for the slim model) and the result."""
    from accelerate import Accelerator

    settings.validate()
    use_gpu = torch.cuda.is_available()
    bf16 = use_gpu if settings.bf16 is None else settings.bf16
    accelerator = accelerator or Accelerator(cpu=not use_gpu, mixed_precision="bf16" if bf16 else "no")
    torch.manual_seed(settings.seed)
    model = trainer.prepare(model, settings)
    checkpointing = settings.gradient_checkpointing or (settings.gradient_checkpointing is None and use_gpu)
    if checkpointing:
        model.gradient_checkpointing_enable()
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    params = list(trainable_parameters(model).values())
    if not params:
        raise RuntimeError("internal error: the trainer left nothing to train")
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, settings.warmup_steps, settings.steps))
    model, optimizer = accelerator.prepare(model, optimizer)
    fingerprint = {"settings": settings.fingerprint(), "data": data.digest, "trainer": trainer.name,
                   "teacher": teacher.teacher_id if teacher else None}
    start, losses, tokens, elapsed, resumed_from = 0, [], 0, 0.0, None
    checkpoint = latest_checkpoint(state_dir) if (resume and state_dir is not None) else None
    if resume and checkpoint is None:
        log.warning("--resume: no checkpoint in %s; starting from step 0", state_dir)
    if checkpoint is not None:
        state = _load_state(checkpoint, accelerator.unwrap_model(model), optimizer, scheduler, fingerprint)
        start, losses, tokens, elapsed = state["step"], state["losses"], state["tokens"], state["elapsed"]
        resumed_from = start
    world, rank = accelerator.num_processes, accelerator.process_index
    if teacher is not None:
        teacher.device = accelerator.device
    began = time.perf_counter() - elapsed
    for step in range(start, settings.steps):
        step_began = time.perf_counter()
        ids = torch.cat([data.windows[i] for i in batch_indices(step, settings.batch_size, len(data.windows),
                                                                 settings.seed, rank, world)]).to(accelerator.device)
        with accelerator.autocast():
            logits = model(input_ids=ids, use_cache=False).logits
        loss = lm_loss(logits, ids)
        if teacher is not None:
            loss = mixed_loss(loss, teacher.loss(logits, ids), teacher.settings.weight)
        accelerator.backward(loss)
        if settings.max_grad_norm:
            accelerator.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        trainer.after_step(accelerator.unwrap_model(model))
        value = float(accelerator.reduce(loss.detach(), reduction="mean"))
        step_tokens = ids.numel() * world
        tokens += step_tokens
        losses.append([step + 1, round(value, 6)])
        if on_step is not None and accelerator.is_main_process:
            on_step(StepInfo(step + 1, settings.steps, value, tokens,
                             step_tokens / max(1e-9, time.perf_counter() - step_began), accelerator.unwrap_model(model)))
        done = step + 1
        if state_dir is not None and settings.checkpoint_every and done % settings.checkpoint_every == 0 \
                and done < settings.steps and accelerator.is_main_process:
            _save_state(state_dir, done, accelerator.unwrap_model(model), optimizer, scheduler,
                        {"fingerprint": fingerprint, "losses": losses, "tokens": tokens,
                         "elapsed": time.perf_counter() - began})
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model)
    if checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    cache = {"hits": teacher.cache_hits, "misses": teacher.cache_misses} if teacher and teacher.settings.top_k else {}
    result = TrainResult(settings.steps, tokens, losses, round(time.perf_counter() - began, 2), resumed_from,
                         str(accelerator.device), cache)
    return model, result
