"""`--vocab-keep auto`: choose the vocabulary size by what it costs, measured.

The calibration text is split into chunks; one in HELDOUT_EVERY is held out of the token counts. For a kept
vocabulary of K tokens (chosen from the counts by `kept_token_ids`) the dense model is scored on the held-out text
exactly as the vocabulary-pruned model would score it: the text tokenized by the pruned tokenizer, the new ids
looked up in the kept embedding rows and the softmax taken over the kept rows of the LM head
(`RestrictedVocabulary`). Its NLL per UTF-8 byte against the dense model's, in the dense model's tokens
(`dense_equivalent_ratio`), is the cost of K. The smallest K on a grid whose cost stays within the tolerance is
kept (binary search: fewer tokens never cost less), but never more than the ratio's whole budget; the widths pay
for the rest. The final token set is counted on the whole calibration text.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from depgraph_llm.errors import UserError
from depgraph_llm.planning.vocab import kept_token_ids, restricted_tokenizer

log = logging.getLogger(__name__)

AUTO_VOCAB = "auto"      # --vocab-keep auto
HELDOUT_EVERY = 5        # one chunk in five is held out of the counts and scored
CHUNK_CHARS = 2000       # chunks are whole lines, at least this long
HELDOUT_CHARS = 16_000   # about 4k tokens of English: enough to rank candidates, a few forward passes each
GRID_STEPS = 16          # candidates: multiples of 1/16 of the vocabulary
ROUND_TO = 64            # kept vocabulary a multiple of 64 rows (embedding / LM-head matmuls stay aligned)
DEFAULT_TOLERANCE = 0.01  # "nearly free": at most 1% perplexity on held-out text, in the dense model's tokens


class RestrictedVocabulary(nn.Module):
    """The dense model computing what its vocabulary-pruned copy computes: ids of the pruned tokenizer index the
    kept rows of the embedding, and the logits are those of the kept rows of the LM head."""

    def __init__(self, model: nn.Module, kept: list[int]):
        super().__init__()
        self.model = model
        self.register_buffer("kept", torch.tensor(kept, dtype=torch.long), persistent=False)

    def forward(self, input_ids: torch.Tensor, **kwargs):
        output = self.model(input_ids=self.kept[input_ids], **kwargs)
        output.logits = output.logits[..., self.kept]
        return output


@torch.no_grad()
def nll_per_byte(model: nn.Module, tokenizer, text: str, seq_len: int) -> tuple[float, int, int]:
    """(NLL per UTF-8 byte, bytes, predicted tokens) of `text` scored in consecutive windows of `seq_len` tokens,
    the last one partial, so every tokenizer is scored on the same text."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    total, n_bytes, predicted = 0.0, 0, 0
    for start in range(0, len(ids), seq_len):
        window = ids[start:start + seq_len]
        if len(window) < 2:
            continue
        input_ids = torch.tensor([window])
        log_probs = torch.log_softmax(model(input_ids=input_ids, use_cache=False).logits[:, :-1].float(), -1)
        total -= log_probs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).sum().item()
        n_bytes += len(tokenizer.decode(window[1:]).encode("utf-8"))
        predicted += len(window) - 1
    if not n_bytes:
        raise UserError("--vocab-keep auto: the held-out calibration text is empty; pass more calibration text")
    return total / n_bytes, n_bytes, predicted


def counted_and_heldout(texts: list[str]) -> tuple[str, str]:
    """Split each text into line chunks; every HELDOUT_EVERY-th chunk is held out. The held-out text takes chunks
    from the texts in turn (every register is scored) up to HELDOUT_CHARS."""
    counted, held = [], []
    for text in texts:
        chunks = _line_chunks(text)
        held.append(chunks[HELDOUT_EVERY - 1::HELDOUT_EVERY])
        counted.extend(c for i, c in enumerate(chunks) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1)
    heldout, size = [], 0
    for round_ in range(max((len(h) for h in held), default=0)):
        for chunks in held:
            if round_ < len(chunks) and size < HELDOUT_CHARS:
                heldout.append(chunks[round_])
                size += len(chunks[round_])
    return _joined(counted), _joined(heldout)


def _joined(chunks: list[str]) -> str:
    return "".join(c if c.endswith("\n") else c + "\n" for c in chunks)


def _line_chunks(text: str) -> list[str]:
    chunks, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if size >= CHUNK_CHARS:
            chunks.append("".join(current))
            current, size = [], 0
    if current:
        chunks.append("".join(current))
    return chunks


@dataclass
class VocabChoice:
    """The kept vocabulary size and the measured costs that chose it (for the report)."""

    keep: int
    tolerance: float
    floor: int  # fewest tokens the ratio's budget allows the vocabulary to keep
    costs: dict[int, float] = field(default_factory=dict)  # K -> perplexity ratio in the dense model's tokens
    heldout_bytes: int = 0

    def record(self) -> dict:
        return {"rule": "auto", "keep": self.keep, "tolerance": self.tolerance, "budget_floor": self.floor,
                "heldout_bytes": self.heldout_bytes, "heldout_every": HELDOUT_EVERY,
                "measured": [{"keep": k, "ppl_ratio": round(c, 4)} for k, c in sorted(self.costs.items())]}


def grid(vocab_rows: int, floor: int) -> list[int]:
    """Candidate sizes, ascending: multiples of 1/GRID_STEPS of the vocabulary (rounded up to ROUND_TO), at or
    above `floor` and below the full vocabulary."""
    sizes = {min(vocab_rows, ROUND_TO * math.ceil(vocab_rows * i / GRID_STEPS / ROUND_TO)) for i in range(1, GRID_STEPS)}
    return sorted(k for k in sizes if floor <= k < vocab_rows)


def choose_vocab_keep(cost_of: Callable[[int], float], vocab_rows: int, floor: int, tolerance: float,
                      show_progress: bool = False) -> VocabChoice:
    """Smallest grid size whose cost (`cost_of(K)`, a perplexity ratio, 1 = free) is within 1 + tolerance, by
    binary search (cost does not fall as K falls); the full vocabulary when none is."""
    candidates = grid(vocab_rows, floor)
    choice = VocabChoice(keep=vocab_rows, tolerance=tolerance, floor=floor)
    low, high = 0, len(candidates) - 1
    bar = tqdm(total=max(1, math.ceil(math.log2(len(candidates) + 1))), desc="vocabulary cost",
               disable=not show_progress, leave=False)
    while low <= high:
        middle = (low + high) // 2
        k = candidates[middle]
        choice.costs[k] = cost_of(k)
        bar.update(1)
        if choice.costs[k] <= 1 + tolerance:
            choice.keep, high = k, middle - 1
        else:
            low = middle + 1
    bar.close()
    return choice


def row_params(model: nn.Module) -> int:
    """Parameters one token row holds: its embedding row, plus its LM-head row (and bias) when not tied."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    per_row = embedding.shape[1]
    if head is not None and head.weight.data_ptr() != embedding.data_ptr():
        per_row += head.weight.shape[1] + (1 if getattr(head, "bias", None) is not None else 0)
    return per_row


def auto_vocab(model: nn.Module, tokenizer, texts: list[str], ratio: float, seq_len: int,
               tolerance: float = DEFAULT_TOLERANCE, show_progress: bool = False) -> tuple[list[int], VocabChoice]:
    """Kept token ids and the choice record for `--vocab-keep auto` on calibration `texts` (see the module
    docstring); the vocabulary removes at most `ratio` of the model's parameters."""
    counted, heldout = counted_and_heldout(texts)
    rows = model.get_input_embeddings().weight.shape[0]
    total = sum(p.numel() for p in model.parameters())
    floor = max(1, rows - int(ratio * total) // row_params(model))
    counts = Counter(tokenizer(counted, add_special_tokens=False).input_ids)
    dense, n_bytes, predicted = nll_per_byte(model, tokenizer, heldout, seq_len)
    dense_bytes_per_token = n_bytes / predicted

    def cost_of(keep: int) -> float:
        try:
            kept = kept_token_ids(tokenizer, counts, keep, rows)
        except UserError:
            return math.inf  # below the tokens every text needs
        restricted, _, _ = nll_per_byte(RestrictedVocabulary(model, kept), restricted_tokenizer(tokenizer, kept),
                                        heldout, seq_len)
        return math.exp((restricted - dense) * dense_bytes_per_token)

    was_training = model.training
    model.eval()
    choice = choose_vocab_keep(cost_of, rows, floor, tolerance, show_progress)
    model.train(was_training)
    choice.heldout_bytes = n_bytes
    log.info("--vocab-keep auto: %d of %d tokens (measured %s)", choice.keep, rows,
             ", ".join(f"{k}: x{c:.3f}" for k, c in sorted(choice.costs.items())))
    all_counts = Counter(tokenizer("\n".join(texts), add_special_tokens=False).input_ids)
    return kept_token_ids(tokenizer, all_counts, choice.keep, rows), choice
