"""Prefill/decode throughput and peak memory, dense vs pruned, in one process on the same inputs."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .memory import PeakRSS


@dataclass
class SpeedResult:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_memory_bytes: int
    device: str
    dtype: str
    prompt_tokens: int
    decode_tokens: int
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


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
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    input_ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed)).to(device)
    model.eval()
    for _ in range(warmup):
        _one_run(model, input_ids, decode_tokens)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill, decode = [], []
    with PeakRSS() as rss:
        for _ in range(repeats):
            p, d = _one_run(model, input_ids, decode_tokens)
            prefill.append(p)
            decode.append(d)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # CPU: weights + the RSS growth while running (other objects in the process are not counted)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else weights + rss.delta_bytes
    return SpeedResult(prompt_tokens / statistics.median(prefill), decode_tokens / statistics.median(decode),
                       int(peak), str(device), str(next(model.parameters()).dtype), prompt_tokens, decode_tokens, repeats)


def compare_speed(dense: nn.Module, pruned: nn.Module, **kwargs) -> dict:
    """Measure both models side by side (interleaved, same inputs) and report achieved vs ideal speedup."""
    rounds = kwargs.pop("rounds", 2)
    dense_runs, pruned_runs = [], []
    for _ in range(rounds):  # interleave so drift in machine load hits both alike
        dense_runs.append(measure_speed(dense, **kwargs))
        pruned_runs.append(measure_speed(pruned, **kwargs))
    pick = lambda runs, key: statistics.median(getattr(r, key) for r in runs)  # noqa: E731
    result = {"dense": dense_runs[-1].to_dict(), "pruned": pruned_runs[-1].to_dict()}
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        result["dense"][key], result["pruned"][key] = pick(dense_runs, key), pick(pruned_runs, key)
    result["speedup_prefill"] = result["pruned"]["prefill_tokens_per_s"] / result["dense"]["prefill_tokens_per_s"]
    result["speedup_decode"] = result["pruned"]["decode_tokens_per_s"] / result["dense"]["decode_tokens_per_s"]
    result["ideal_speedup_flops"] = linear_flops_per_token(dense) / linear_flops_per_token(pruned)
    return result
