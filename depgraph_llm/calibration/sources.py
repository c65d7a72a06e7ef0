"""Text for calibration and evaluation: local files or folders, loaded through `datasets`, cut into token windows."""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from depgraph_llm.calibration.corpora import CorpusPart, available_registers, corpus_part
from depgraph_llm.errors import UserError
from depgraph_llm.calibration.self_generation import SELF_RECIPES, DEFAULT_SELF_RECIPE, SelfRecipe, self_generated_windows

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




# The default calibration mix: legal prose, technical documentation, definitions. fortunes and jargon stay out
# of it so that the benchmark always has registers the default never calibrated on.
DEFAULT_MIX = ("licences", "python-docs", "wordnet")
DEFAULT_CALIBRATION_REGISTERS = DEFAULT_MIX  # better than licences alone off-register: docs/results/bench-calibration
# Default evaluation text: the first present of these registers, evaluation part (licences first, so the
# quoted dense perplexity 24.9 stays comparable).
DEFAULT_EVAL_REGISTERS = ("licences", "python-docs", "wordnet")


@dataclass(frozen=True)
class CalibrationSource:
    """Where calibration windows come from: corpus parts (equal windows from each) or, with none, the model."""

    parts: tuple[CorpusPart, ...] = ()
    label: str = "self"  # "mixed" (registers), "files" (--calibration PATH), "self" (generated by the model)
    recipe: SelfRecipe = SELF_RECIPES[DEFAULT_SELF_RECIPE]
    hash_ordered: bool = True  # parts are corpus parts (hash-ordered units): windows come from their start

    @property
    def is_self(self) -> bool:
        return not self.parts

    def text(self) -> str | None:
        """All calibration text (for counting tokens), or None when self-generated."""
        return None if self.is_self else "\n\n".join(p.text for p in self.parts)

    def window_counts(self, count: int, seed: int) -> list[int]:
        """Windows per part: equal, the remainder given to parts drawn with `seed`."""
        base, extra = divmod(count, len(self.parts))
        lucky = set(random.Random(seed).sample(range(len(self.parts)), extra))
        return [base + (i in lucky) for i in range(len(self.parts))]

    def windows(self, model, tokenizer, seq_len: int, count: int, seed: int,
                show_progress: bool = False) -> list[torch.Tensor]:
        """`count` windows of `seq_len` tokens: drawn with `seed` from each part in turn, or self-generated."""
        if self.is_self:
            return self_generated_windows(model, tokenizer, seq_len, count, seed, show_progress, self.recipe)
        per_part = [token_windows(tokenizer, self._drawn_from(part, k, seq_len), seq_len, k, seed,
                                  purpose=f"{part.register} calibration")
                    if k else [] for part, k in zip(self.parts, self.window_counts(count, seed))]
        rounds = max(len(w) for w in per_part)
        return [w[i] for i in range(rounds) for w in per_part if i < len(w)]

    def _drawn_from(self, part: CorpusPart, count: int, seq_len: int) -> str:
        return _prefix(part.text, count, seq_len) if self.hash_ordered else part.text

    def record(self, seq_len: int, count: int, seed: int) -> dict:
        """Provenance for the report: source, registers with files and sha256 of their text, seed, windows."""
        record = {"source": self.label, "seed": seed, "windows": count, "seq_len": seq_len}
        if self.is_self:
            return {**record, "recipe": self.recipe.record()}
        counts = self.window_counts(count, seed)
        return {**record, "parts": [{**p.record(), "windows": k,
                                     "drawn_from_chars": len(self._drawn_from(p, k, seq_len))}
                                    for p, k in zip(self.parts, counts)]}


CHARS_PER_TOKEN = 6  # generous for English: the prefix below holds at least the windows it is meant to


def _prefix(text: str, count: int, seq_len: int) -> str:
    """The start of a part that windows are drawn from: room for max(64, 4 * count) windows, so tokenizing a
    large register stays quick; corpus parts are ordered by a hash of their units, so the start spans the part."""
    return text[:max(64, 4 * count) * seq_len * CHARS_PER_TOKEN]


def file_source(path: Path) -> CalibrationSource:
    """--calibration PATH: one part holding the text of the file or folder."""
    return file_source_of(_text_files(path))


def file_source_of(files: list) -> CalibrationSource:
    """One part holding the text of these files, in this order."""
    files = [Path(f) for f in files]
    return CalibrationSource((CorpusPart("file", "calibration", tuple(str(f) for f in files), len(files),
                                         load_text(files)),), label="files", hash_ordered=False)


def self_source(recipe: SelfRecipe | str = DEFAULT_SELF_RECIPE) -> CalibrationSource:
    """Windows sampled from the dense model by `recipe`."""
    return CalibrationSource(recipe=SELF_RECIPES[recipe] if isinstance(recipe, str) else recipe)


def mixed_source(registers: tuple[str, ...] = DEFAULT_MIX) -> CalibrationSource:
    """The calibration parts of the present registers; self-generated text (logged) when none is present."""
    present = available_registers(registers)
    if not present:
        log.warning("no calibration text found (registers %s absent; run scripts/fetch_corpora.py): "
                    "calibrating on text the model generates itself", ", ".join(registers))
        return self_source()
    missing = [r for r in registers if r not in present]
    if missing:
        log.info("calibration registers %s absent (run scripts/fetch_corpora.py); using %s",
                 ", ".join(missing), ", ".join(present))
    return CalibrationSource(tuple(corpus_part(r, "calibration") for r in present), label="mixed")


def default_calibration_source() -> CalibrationSource:
    """What `prune` calibrates on without --calibration: DEFAULT_CALIBRATION_REGISTERS, else self-generated."""
    return mixed_source(DEFAULT_CALIBRATION_REGISTERS)


def default_eval_part(registers: tuple[str, ...] = DEFAULT_EVAL_REGISTERS) -> CorpusPart | None:
    """The evaluation part of the first present register, or None (logged) when none is present."""
    present = available_registers(registers)
    if not present:
        log.warning("no evaluation text found (registers %s absent): evaluating on text the model generates "
                    "itself with another seed", ", ".join(registers))
        return None
    return corpus_part(present[0], "evaluation")


def evaluation_text(path: str | Path | None) -> tuple[str | None, list[str]]:
    """The evaluation text and its files: `path`, else the default evaluation part, else (None, []) when no
    register is present (the caller generates text with the model)."""
    if path:
        return load_text([Path(path)]), [str(path)]
    part = default_eval_part()
    return (part.text, list(part.files)) if part else (None, [])


def generated_eval_text(model, tokenizer, seq_len: int, tokens: int, seed: int) -> str:
    """Evaluation text when no corpus is present: dense-model samples with a seed disjoint from calibration's."""
    windows = self_generated_windows(model, tokenizer, seq_len, max(1, tokens // seq_len) + 1, seed + 1_000_003)
    return "".join(tokenizer.decode(w[0], skip_special_tokens=True) for w in windows)  # +1: re-tokenizing may shrink
