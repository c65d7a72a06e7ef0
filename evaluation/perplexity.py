"""Perplexity with a fixed protocol, so numbers from different runs compare.

Protocol: tokenize the text with no special tokens, take the first `max_tokens` tokens, cut them into
non-overlapping windows of `seq_len` (a trailing partial window is dropped), score every window independently
(no context carried over) in float32, and report exp(total NLL / predicted tokens); each window predicts
seq_len - 1 tokens.
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
    return PerplexityResult(math.exp(total_nll / predicted), predicted + len(windows), len(windows), seq_len)
