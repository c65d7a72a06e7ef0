"""`--vocab-keep auto`: choose the vocabulary size by what the whole plan costs, measured.

Removing token rows and removing widths spend the same parameter budget, so the vocabulary size is chosen with
the widths, not before them: for a kept vocabulary of K tokens the planner fills the rest of the ratio's budget
with widths, and the model pruned by that plan (without reconstruction) is scored per UTF-8 byte, so that every
tokenizer is scored on the same text (`nll_per_byte`), on what the dense model writes when started from
`openings` of calibration text held out of the token counts (the held-out text itself is in-register: it rarely
needs a token the counts dropped, and flatters small vocabularies; job/vocab_choice.py). The K
with the lowest cost is kept (`lowest_cost`: a ternary search over a grid of sizes, which assumes one valley:
fewer tokens cost more in the vocabulary and less in the widths). The job-level loop is job/vocab_choice.py.

`RestrictedVocabulary` (the dense model computing what its vocabulary-pruned copy computes) serves the
distillation of vocabulary-pruned students (job/recover.py).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from depgraph_llm.errors import UserError

AUTO_VOCAB = "auto"      # --vocab-keep auto
HELDOUT_EVERY = 5        # one chunk in five is held out of the counts and scored
CHUNK_CHARS = 2000       # chunks are whole lines, at least this long
HELDOUT_CHARS = 16_000   # about 4k tokens of English: enough to rank candidates, a few forward passes each
OPENINGS = 8            # continuations the dense model writes for the off-register cost (`openings`)
OPENING_TOKENS = 16     # tokens of held-out text each continuation starts from
CONTINUATION_SEED_OFFSET = 2_000_003  # the continuations' sampling seed: --seed + this, apart from calibration's
GRID_STEPS = 16          # candidates: multiples of 1/16 of the vocabulary
ROUND_TO = 64            # kept vocabulary a multiple of 64 rows (embedding / LM-head matmuls stay aligned)


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

    # the recovery loop turns these on for the model it trains (a masked, vocabulary-pruned plan trains this wrapper)
    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.model.gradient_checkpointing_enable(**kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing_disable()

    def enable_input_require_grads(self) -> None:
        self.model.enable_input_require_grads()


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


def openings(tokenizer, heldout: str, count: int = OPENINGS, length: int = OPENING_TOKENS) -> list[list[int]]:
    """`count` runs of `length` token ids, evenly spaced through the held-out text (fewer and shorter where the
    text is short): where the dense model's continuations start."""
    ids = tokenizer(heldout, add_special_tokens=False).input_ids
    length = min(length, len(ids))
    if length < 1:
        raise UserError("--vocab-keep auto: the held-out calibration text is empty; pass more calibration text")
    starts = sorted({round(i * (len(ids) - length) / max(1, count - 1)) for i in range(count)})
    return [ids[s:s + length] for s in starts]


def continuation_settings(seq_len: int, seed: int) -> tuple[int, int]:
    """(new tokens per continuation, sampling seed) of the dense continuations `--vocab-keep auto` scores on."""
    return max(OPENING_TOKENS, seq_len - OPENING_TOKENS), seed + CONTINUATION_SEED_OFFSET


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


def grid(vocab_rows: int, floor: int) -> list[int]:
    """Candidate sizes, ascending: multiples of 1/GRID_STEPS of the vocabulary (rounded up to ROUND_TO), at or
    above `floor` and below the full vocabulary, and `floor` itself rounded up (where the vocabulary alone pays
    the whole budget, floor > 1) so that a cost still falling at the lowest multiple is measured to the end."""
    sizes = {min(vocab_rows, ROUND_TO * math.ceil(vocab_rows * i / GRID_STEPS / ROUND_TO)) for i in range(1, GRID_STEPS)}
    if floor > 1:
        sizes.add(ROUND_TO * math.ceil(floor / ROUND_TO))
    return sorted(k for k in sizes if floor <= k < vocab_rows)


def lowest_cost(candidates: list[int], cost_of: Callable[[int], float],
                on_measure: Callable[[], None] | None = None) -> tuple[int, dict[int, float]]:
    """The candidate (ascending list) with the lowest `cost_of`, by a ternary search that assumes one valley, then
    every candidate left in the final bracket; ties go to the larger candidate. Returns it and every measured
    cost."""
    costs: dict[int, float] = {}

    def cost(index: int) -> float:
        k = candidates[index]
        if k not in costs:
            costs[k] = cost_of(k)
            if on_measure:
                on_measure()
        return costs[k]

    low, high = 0, len(candidates) - 1
    while high - low > 2:
        left, right = low + (high - low) // 3, high - (high - low) // 3
        if cost(left) < cost(right):
            high = right - 1
        elif cost(left) > cost(right):
            low = left + 1
        else:  # a flat stretch: keep its larger side (ties go to the larger vocabulary)
            low = left
    for index in range(low, high + 1):
        cost(index)
    return min(costs, key=lambda k: (costs[k], -k)), costs


def search_steps(candidates: int) -> int:
    """An upper bound on the candidates `lowest_cost` measures (for its progress bar)."""
    steps, size = 0, candidates
    while size > 3:
        steps, size = steps + 2, size - size // 3
    return min(candidates, steps + size)


def row_params(model: nn.Module) -> int:
    """Parameters one token row holds: its embedding row, plus its LM-head row (and bias) when not tied."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    per_row = embedding.shape[1]
    if head is not None and head.weight.data_ptr() != embedding.data_ptr():
        per_row += head.weight.shape[1] + (1 if getattr(head, "bias", None) is not None else 0)
    return per_row
