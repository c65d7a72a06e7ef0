"""Prefill/decode throughput, dense vs pruned, in one process on the same inputs, with the spread of repeats.

Peak memory is measured apart, each model in its own process (memory.py): a process that has held other models
cannot say what one of them needs.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

SPREAD_WARNING = 0.25  # (max - min) / median of the repeats above this: the machine was too busy to trust


@dataclass
class SpeedResult:
    prefill_tokens_per_s: float  # median over the repeats
    decode_tokens_per_s: float
    device: str
    dtype: str
    prompt_tokens: int
    decode_tokens: int
    repeats: int
    prefill_runs: list[float] = field(default_factory=list)  # tokens/s of every repeat
    decode_runs: list[float] = field(default_factory=list)

    @property
    def prefill_spread(self) -> float:
        return spread(self.prefill_runs)

    @property
    def decode_spread(self) -> float:
        return spread(self.decode_runs)

    def to_dict(self) -> dict:
        return {**asdict(self), "prefill_spread": self.prefill_spread, "decode_spread": self.decode_spread}


def spread(values: list[float]) -> float:
    """(max - min) / median: how far apart the repeats are, relative to what is reported."""
    return (max(values) - min(values)) / statistics.median(values) if values else 0.0


def random_prompt(model: nn.Module, tokens: int, seed: int = 0) -> torch.Tensor:
    """A (1, tokens) prompt of random token ids on the model's device."""
    vocab = model.get_input_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    return torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed)).to(device)


def linear_flops_per_token(model: nn.Module) -> int:
    """2 x multiply-accumulates of every linear layer (LM head included) for one token."""
    return sum(2 * m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _one_run(model: nn.Module, input_ids: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
    device = input_ids.device
    _sync(device)
    start = time.perf_counter()
    model(input_ids=input_ids, use_cache=False)
    _sync(device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(input_ids, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False,
                   pad_token_id=0)
    _sync(device)
    total = time.perf_counter() - start  # prefill (with cache) + decode steps
    return prefill, max(total - prefill, 1e-9)


def measure_speed(model: nn.Module, prompt_tokens: int = 256, decode_tokens: int = 32, repeats: int = 3,
                  warmup: int = 1, seed: int = 0) -> SpeedResult:
    """Median prefill and decode tokens/s over `repeats` runs after `warmup`, batch 1, random token prompt."""
    input_ids = random_prompt(model, prompt_tokens, seed)
    model.eval()
    for _ in range(warmup):
        _one_run(model, input_ids, decode_tokens)
    prefill, decode = [], []
    for _ in range(repeats):
        p, d = _one_run(model, input_ids, decode_tokens)
        prefill.append(prompt_tokens / p)
        decode.append(decode_tokens / d)
    return SpeedResult(statistics.median(prefill), statistics.median(decode), str(input_ids.device),
                       str(next(model.parameters()).dtype), prompt_tokens, decode_tokens, repeats, prefill, decode)


def compare_speed(dense: nn.Module, pruned: nn.Module, **kwargs) -> dict:
    """Measure both models side by side (interleaved, same inputs): achieved vs ideal speedup, the spread of the
    repeats, and a warning when a spread is too wide for the speedup to mean much."""
    rounds = kwargs.pop("rounds", 2)
    runs: dict[str, list[SpeedResult]] = {"dense": [], "pruned": []}
    for _ in range(rounds):  # interleave so drift in machine load hits both alike
        runs["dense"].append(measure_speed(dense, **kwargs))
        runs["pruned"].append(measure_speed(pruned, **kwargs))
    result: dict = {}
    for side, measured in runs.items():
        pooled = SpeedResult(0.0, 0.0, measured[0].device, measured[0].dtype, measured[0].prompt_tokens,
                             measured[0].decode_tokens, sum(r.repeats for r in measured),
                             [v for r in measured for v in r.prefill_runs], [v for r in measured for v in r.decode_runs])
        pooled.prefill_tokens_per_s = statistics.median(pooled.prefill_runs)
        pooled.decode_tokens_per_s = statistics.median(pooled.decode_runs)
        result[side] = pooled.to_dict()
    result["speedup_prefill"] = result["pruned"]["prefill_tokens_per_s"] / result["dense"]["prefill_tokens_per_s"]
    result["speedup_decode"] = result["pruned"]["decode_tokens_per_s"] / result["dense"]["decode_tokens_per_s"]
    result["ideal_speedup_flops"] = linear_flops_per_token(dense) / linear_flops_per_token(pruned)
    wide = [f"{side} {phase} {result[side][phase + '_spread']:.0%}" for side in ("dense", "pruned")
            for phase in ("prefill", "decode") if result[side][phase + "_spread"] > SPREAD_WARNING]
    result["warning"] = (f"repeats spread more than {SPREAD_WARNING:.0%} ({', '.join(wide)}): the machine was busy, "
                         "do not trust these speedups; rerun on an idle machine" if wide else None)
    return result
