"""Distillation from the dense model: KL on temperature-scaled logits (pure functions), mixed with the LM loss,
and teacher logits either computed on the fly or read from a top-k cache on disk.

Memory (per process, B windows of L tokens, vocabulary V, teacher with P parameters):
- on the fly: the teacher's weights (P x 4 bytes in fp32, 2 in bf16) stay loaded, plus one no-grad forward and its
  B x L x V logits (x 4 bytes); exact KL over the whole vocabulary.
- top-k cache: B x L x k x 6 bytes per batch on disk (fp16 values + int32 indices); the teacher is only loaded
  while a window is missing from the cache, so a second run with the same teacher and data never loads it.
  KL is then taken over the teacher's k most likely tokens (their probabilities renormalised), against the
  student's full-vocabulary log-probabilities at those tokens.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass
class DistillSettings:
    """How the teacher's logits enter the loss."""

    weight: float = 1.0  # 1.0: KL only; 0.0: LM loss only; in between, weight * KL + (1 - weight) * LM
    temperature: float = 1.0
    top_k: int = 0  # 0: full logits on the fly; k > 0: top-k logits, cached on disk when cache_dir is set
    cache_dir: Path | None = None


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of (B, L, V) logits on (B, L) tokens."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) on softmax(logits / T), scaled by T^2 (Hinton et al.)."""
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    return kl.mean() * t * t


def topk_kl_loss(student_logits: torch.Tensor, top_values: torch.Tensor, top_indices: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """KL over the teacher's top-k tokens: renormalised teacher probabilities vs the student's log-probabilities."""
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1).gather(-1, top_indices.long())
    teacher = F.log_softmax(top_values.float() / t, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    return kl.mean() * t * t


def mixed_loss(lm: torch.Tensor, kl: torch.Tensor, weight: float) -> torch.Tensor:
    """weight * KL + (1 - weight) * LM."""
    if weight >= 1.0:
        return kl
    if weight <= 0.0:
        return lm
    return weight * kl + (1.0 - weight) * lm


class Teacher:
    """The dense model's logits for a batch: full (on the fly) or top-k (cached on disk per window)."""

    def __init__(self, loader, settings: DistillSettings, teacher_id: str, device: torch.device) -> None:
        self._loader = loader  # () -> nn.Module, called at most once
        self._model = None
        self.settings = settings
        self.teacher_id = teacher_id
        self.device = device
        self.cache_hits = 0
        self.cache_misses = 0

    @property
    def model(self):
        if self._model is None:
            self._model = self._loader().to(self.device).eval()
            for param in self._model.parameters():
                param.requires_grad_(False)
        return self._model

    @torch.no_grad()
    def full_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits.float()

    def _cache_file(self, window: torch.Tensor) -> Path:
        digest = hashlib.sha256(window.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:32]
        folder = Path(self.settings.cache_dir) / f"{self.teacher_id[:16]}-top{self.settings.top_k}"
        return folder / f"{digest}.pt"

    @torch.no_grad()
    def topk(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values fp16, indices int32), each (B, L, k); windows found in the cache skip the teacher."""
        values, indices = [], []
        for window in input_ids:
            path = self._cache_file(window) if self.settings.cache_dir else None
            if path is not None and path.is_file():
                entry = torch.load(path, map_location="cpu", weights_only=True)
                self.cache_hits += 1
            else:
                logits = self.full_logits(window.unsqueeze(0))[0]
                top = logits.topk(self.settings.top_k, dim=-1)
                entry = {"values": top.values.half().cpu(), "indices": top.indices.int().cpu()}
                self.cache_misses += 1
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(f".tmp{id(entry)}")
                    torch.save(entry, tmp)
                    tmp.replace(path)
            values.append(entry["values"])
            indices.append(entry["indices"])
        return torch.stack(values).to(self.device), torch.stack(indices).to(self.device)

    def loss(self, student_logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The distillation term for this batch."""
        if self.settings.top_k:
            values, indices = self.topk(input_ids)
            return topk_kl_loss(student_logits, values, indices, self.settings.temperature)
        return kl_loss(student_logits, self.full_logits(input_ids), self.settings.temperature)
