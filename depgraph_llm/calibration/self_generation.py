"""Calibration windows sampled from the dense model itself, so no dataset is needed.

A recipe says how each window starts (a random ordinary token, the model's begin-of-text token, or a short
generic seed phrase), how it is sampled (temperature, nucleus top-p), and whether the least likely windows
are dropped afterwards (Ji et al., "Beware of Calibration Data for Pruning LLMs": self-generate, then filter
by perplexity). Recipes are data in SELF_RECIPES; which is the default is decided by
docs/results/bench-calibration.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import torch

from depgraph_llm.errors import UserError

# Short openings of several registers (prose, documentation, definitions, dialogue); generic, no corpus text.
SEED_PROMPTS = ("The", "In", "A", "This", "It is", "When", "There are", "One of the", "If you", "According to",
                "We", "How to", "Chapter 1", "Definition:", "Note:", "Once upon a time", "In this section,",
                "The following", "Q:", "Introduction")


@dataclass(frozen=True)
class SelfRecipe:
    """How self-generated calibration text is sampled."""

    start: str = "random-token"  # "random-token" | "bos" | "seeds"
    temperature: float = 1.0
    top_p: float = 1.0
    drop_fraction: float = 0.0  # generate count / (1 - f) windows, drop the f highest-perplexity ones

    def record(self) -> dict:
        return asdict(self)


SELF_RECIPES: dict[str, SelfRecipe] = {
    "random-token": SelfRecipe(),
    "bos-p95": SelfRecipe(start="bos", temperature=1.0, top_p=0.95),
    "seeds-t08-p95": SelfRecipe(start="seeds", temperature=0.8, top_p=0.95),
    "seeds-t08-p95-filter": SelfRecipe(start="seeds", temperature=0.8, top_p=0.95, drop_fraction=0.2),
}
DEFAULT_SELF_RECIPE = "random-token"


def _starts(tokenizer, recipe: SelfRecipe, size: int, ordinary: torch.Tensor, generator: torch.Generator,
            rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of `size` prompts, left-padded to one length."""
    if recipe.start == "random-token":
        first = ordinary[torch.randint(len(ordinary), (size, 1), generator=generator)]
        return first, torch.ones_like(first)
    if recipe.start == "bos":
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos is None:
            raise UserError("the tokenizer has no begin- or end-of-text token to start from; use another recipe")
        first = torch.full((size, 1), bos)
        return first, torch.ones_like(first)
    if recipe.start != "seeds":
        raise UserError(f"self-generation start {recipe.start!r} is not available; use random-token, bos or seeds")
    prompts = [tokenizer(rng.choice(SEED_PROMPTS), add_special_tokens=False).input_ids for _ in range(size)]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@torch.no_grad()
def _window_nll(model, window: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood of one window under `model`."""
    logits = model(input_ids=window, use_cache=False).logits.float()
    return torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:]).item()


@torch.no_grad()
def self_generated_windows(model, tokenizer, seq_len: int, count: int, seed: int = 0, show_progress: bool = False,
                           recipe: SelfRecipe | str = DEFAULT_SELF_RECIPE) -> list[torch.Tensor]:
    """`count` windows of `seq_len` tokens sampled from the model by `recipe` (end-of-text suppressed)."""
    recipe = SELF_RECIPES[recipe] if isinstance(recipe, str) else recipe
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = model.get_input_embeddings().weight.shape[0]
    ordinary = torch.tensor([i for i in range(min(vocab, len(tokenizer))) if i not in special])
    if len(ordinary) == 0:
        raise UserError("the tokenizer has no ordinary tokens to start self-generated calibration; "
                        "pass --calibration FILE")
    total = math.ceil(count / (1.0 - recipe.drop_fraction)) if recipe.drop_fraction else count
    windows: list[torch.Tensor] = []
    batch = 4
    iterator = range(0, total, batch)
    if show_progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="self-generating calibration", unit="batch")
    device = next(model.parameters()).device
    torch.manual_seed(seed)  # generate() samples from the global generator
    sampling = {"top_k": 0, "top_p": recipe.top_p, "temperature": recipe.temperature}
    for start in iterator:
        size = min(batch, total - start)
        ids, mask = _starts(tokenizer, recipe, size, ordinary, generator, rng)
        new = seq_len - int(mask.sum(1).min())
        tokens = model.generate(
            ids.to(device), attention_mask=mask.to(device), do_sample=True, repetition_penalty=1.0,
            max_new_tokens=new, min_new_tokens=new, suppress_tokens=sorted(special) or None,
            pad_token_id=tokenizer.pad_token_id or 0, **sampling).cpu()
        for row, row_mask in zip(tokens, mask):
            kept = row[int((row_mask == 0).sum()):]  # drop the left padding
            windows.append(kept[:seq_len].unsqueeze(0))
    if recipe.drop_fraction:
        scores = [_window_nll(model, w.to(device)) for w in windows]
        order = sorted(range(len(windows)), key=lambda i: scores[i])[:count]
        windows = [windows[i] for i in sorted(order)]
    return windows


@torch.no_grad()
def continued_text(model, tokenizer, openings: list[list[int]], new_tokens: int, seed: int,
                   batch: int = 4, show_progress: bool = False) -> str:
    """What the model writes after each opening (token ids, all of one length): `new_tokens` sampled at
    temperature 1 (end-of-text suppressed), openings left out, each continuation ended by a newline. The global torch
    generator is left as it was."""
    if not openings or len({len(o) for o in openings}) != 1:
        raise ValueError("continued_text needs at least one opening, all of one length")
    special = sorted(set(getattr(tokenizer, "all_special_ids", []) or []))
    device = next(model.parameters()).device
    texts: list[str] = []
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)  # generate() samples from the global generator
        from tqdm.auto import tqdm

        for start in tqdm(range(0, len(openings), batch), desc="dense continuations", unit="batch",
                          disable=not show_progress, leave=False):
            ids = torch.tensor(openings[start:start + batch], device=device)
            tokens = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                repetition_penalty=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                suppress_tokens=special or None, pad_token_id=tokenizer.pad_token_id or 0).cpu()
            texts.extend(tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in tokens)
    return "".join(t + "\n" for t in texts)
