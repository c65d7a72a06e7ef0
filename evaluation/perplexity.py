"""Perplexity with a fixed protocol, so numbers from different runs compare.

Protocol: tokenize the text with no special tokens, take the first `max_tokens` tokens, cut them into
non-overlapping windows of `seq_len` (a trailing partial window is dropped), score every window independently
(no context carried over) in float32, and report exp(total NLL / predicted tokens); each window predicts
seq_len - 1 tokens.

Perplexity per token only compares models that share a tokenizer. A pruned vocabulary (`--vocab-keep`) spells
the same text with more, shorter tokens, so the result also carries the NLL per UTF-8 byte of the text the
predicted tokens spell (each window's predicted tokens decoded together), and `dense_equivalent_ratio` turns two
of them into a perplexity ratio in the reference model's tokens.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from depgraph_llm.calibration.sources import token_windows


@dataclass
class PerplexityResult:
    perplexity: float
    tokens: int
    windows: int
    seq_len: int
    nll_per_byte: float | None = None  # nats per UTF-8 byte of the predicted tokens' text
    bytes: int = 0                     # UTF-8 bytes the predicted tokens spell

    @property
    def bytes_per_token(self) -> float:
        predicted = self.tokens - self.windows
        return self.bytes / predicted if predicted else float("nan")

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, text: str, seq_len: int = 512, max_tokens: int = 4096,
               show_progress: bool = True) -> PerplexityResult:
    """Perplexity of `model` on `text` under the fixed protocol above."""
    windows = token_windows(tokenizer, text, seq_len, max(1, max_tokens // seq_len), purpose="evaluation")
    total_nll, predicted = 0.0, 0
    model.eval()
    for input_ids in tqdm(windows, desc="perplexity", disable=not show_progress, leave=False):
        logits = model(input_ids=input_ids, use_cache=False).logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = input_ids[:, 1:]
        total_nll -= log_probs.gather(-1, targets.unsqueeze(-1)).sum().item()
        predicted += targets.numel()
    return result_of(total_nll, predicted, windows, tokenizer, seq_len)


def predicted_bytes(tokenizer, windows: list[torch.Tensor]) -> int:
    """UTF-8 bytes of the text spelled by every window's predicted tokens (all but the first of each window)."""
    return sum(len(tokenizer.decode(w[0, 1:].tolist()).encode("utf-8")) for w in windows)


def result_of(total_nll: float, predicted: int, windows: list[torch.Tensor], tokenizer, seq_len: int
              ) -> PerplexityResult:
    """The protocol's result from the summed NLL over `predicted` tokens of `windows`."""
    n_bytes = predicted_bytes(tokenizer, windows)
    return PerplexityResult(math.exp(total_nll / predicted), predicted + len(windows), len(windows), seq_len,
                            total_nll / n_bytes if n_bytes else None, n_bytes)


def dense_equivalent_ratio(nll_per_byte: float, reference_nll_per_byte: float,
                           reference_bytes_per_token: float) -> float:
    """Perplexity ratio against a reference model measured per byte and expressed in the reference's tokens:
    exp((NLL/byte - reference NLL/byte) x reference bytes/token). With the same tokenizer on the same text this
    is the plain perplexity ratio; with a pruned vocabulary it charges the longer spellings to the pruned model."""
    return math.exp((nll_per_byte - reference_nll_per_byte) * reference_bytes_per_token)
