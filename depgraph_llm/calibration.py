"""Text for calibration and evaluation: local files or folders, loaded through `datasets`, cut into token windows."""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import torch

from depgraph_llm.errors import UserError

log = logging.getLogger(__name__)
LICENSES = Path("/usr/share/common-licenses")
# Default texts: licence prose present on every Debian/Ubuntu machine. Calibration and evaluation use
# disjoint files (evaluation is the set whose dense perplexity is quoted in shared/assets.md).
DEFAULT_EVAL_FILES = ("GPL-3", "Apache-2.0", "GFDL-1.3", "MPL-2.0", "LGPL-3")
DEFAULT_CALIBRATION_FILES = ("Artistic", "BSD", "CC0-1.0", "MPL-1.1", "GPL-1")
TEXT_SUFFIXES = {"", ".txt", ".md", ".rst", ".text", ".json", ".jsonl"}


def default_files(names: tuple[str, ...]) -> list[Path]:
    files = [LICENSES / n for n in names if (LICENSES / n).is_file()]
    if not files:
        raise UserError(f"no default text found under {LICENSES}; pass --calibration FILE and --eval-text FILE")
    return files


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix in TEXT_SUFFIXES or
                                                                       p.name.endswith(".rst.txt")))
        if files:
            return files
        raise UserError(f"folder {path} holds no text files (.txt, .md, .rst, .json, .jsonl)")
    raise UserError(f"text path {path} does not exist; pass a text file, a folder of them, or a .json/.jsonl file")


def load_text(paths: list[Path] | Path) -> str:
    """Concatenate local text files (plain text or JSON lines with a "text" field) via `datasets`."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from datasets import disable_progress_bars, load_dataset

    disable_progress_bars()

    files = [f for p in ([paths] if isinstance(paths, Path) else paths) for f in _text_files(Path(p))]
    json_files = [str(f) for f in files if f.suffix in (".json", ".jsonl")]
    plain_files = [str(f) for f in files if f.suffix not in (".json", ".jsonl")]
    parts: list[str] = []
    try:
        if plain_files:
            data = load_dataset("text", data_files=plain_files, split="train", sample_by="document")
            parts.extend(data["text"])
        if json_files:
            data = load_dataset("json", data_files=json_files, split="train")
            if "text" not in data.column_names:
                raise UserError(f"JSON text files need a 'text' field; {json_files[0]} has {data.column_names}")
            parts.extend(data["text"])
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for unreadable files
        raise UserError(f"cannot read text from {files[0]}: {str(exc).splitlines()[0][:200]}") from exc
    text = "\n\n".join(t for t in parts if t)
    if not text.strip():
        raise UserError(f"text from {files[0]} is empty; pass a file with prose in it")
    return text


def token_windows(tokenizer, text: str, seq_len: int, count: int | None, seed: int | None = None,
                  purpose: str = "calibration") -> list[torch.Tensor]:
    """Non-overlapping windows of `seq_len` tokens: the first `count` (seed None) or `count` drawn with `seed`."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    available = len(ids) // seq_len
    if available == 0 or (count is not None and available < 1):
        raise UserError(f"{purpose} text has {len(ids)} tokens, fewer than one window of --seq-len {seq_len}; "
                        "pass more text or a smaller --seq-len")
    indices = list(range(available))
    if count is not None and count < available:
        indices = sorted(random.Random(seed).sample(indices, count)) if seed is not None else indices[:count]
    elif count is not None and count > available:
        log.warning("%s text holds only %d windows of %d tokens (asked for %d)", purpose, available, seq_len, count)
    return [ids[i * seq_len:(i + 1) * seq_len].unsqueeze(0) for i in indices]


@torch.no_grad()
def self_generated_windows(model, tokenizer, seq_len: int, count: int, seed: int = 0,
                           show_progress: bool = False) -> list[torch.Tensor]:
    """Calibration windows sampled from the dense model itself, so no dataset is needed.

    Each window starts from a token drawn uniformly from the ordinary (non-special) vocabulary and continues by
    plain sampling (temperature 1, no top-k/top-p, end-of-text suppressed) to `seq_len` tokens, which spreads
    the text over what the model actually knows instead of one greedy mode."""
    generator = torch.Generator().manual_seed(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = model.get_input_embeddings().weight.shape[0]
    ordinary = torch.tensor([i for i in range(min(vocab, len(tokenizer))) if i not in special])
    if len(ordinary) == 0:
        raise UserError("the tokenizer has no ordinary tokens to start self-generated calibration; pass --calibration FILE")
    windows = []
    batch = 4
    iterator = range(0, count, batch)
    if show_progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="self-generating calibration", unit="batch")
    device = next(model.parameters()).device
    torch.manual_seed(seed)  # generate() samples from the global generator
    for start in iterator:
        size = min(batch, count - start)
        first = ordinary[torch.randint(len(ordinary), (size, 1), generator=generator)].to(device)
        tokens = model.generate(
            first, attention_mask=torch.ones_like(first), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            repetition_penalty=1.0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
            suppress_tokens=sorted(special) or None, pad_token_id=tokenizer.pad_token_id or 0)
        windows.extend(tokens[i:i + 1, :seq_len].cpu() for i in range(size))
    return windows
