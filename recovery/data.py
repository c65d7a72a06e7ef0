"""Recovery text: local files, folders, .json/.jsonl (through `datasets`) or `self`; disjoint from evaluation text."""
from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from depgraph_llm.calibration.sources import (LICENSES, CalibrationSource, _text_files, load_text, self_generated_windows,
                                      token_windows)
from depgraph_llm.calibration.corpora import available_registers, corpus_part
from depgraph_llm.errors import UserError
from depgraph_llm.calibration.record import windows_digest

log = logging.getLogger(__name__)
SELF_DATA = "self"
# The training parts of these registers, an equal share of windows from each. The licence register is left out:
# its training part holds older versions of the evaluated licences (GPL-2 beside GPL-3, GFDL-1.2 beside
# GFDL-1.3), so training on it would flatter the default evaluation, which is licence text.
DEFAULT_RECOVERY_REGISTERS = ("python-docs", "wordnet")
# Without the corpora (scripts/fetch_corpora.py not run): licence texts in neither the default calibration nor
# the default evaluation set.
FALLBACK_RECOVERY_FILES = ("GPL-2", "LGPL-2", "LGPL-2.1")


def default_recovery_source() -> CalibrationSource | None:
    """The training parts of the present DEFAULT_RECOVERY_REGISTERS, or None when none is present."""
    present = available_registers(DEFAULT_RECOVERY_REGISTERS)
    return CalibrationSource(tuple(corpus_part(r, "training") for r in present), label="mixed") if present else None


def fallback_recovery_files() -> list[Path]:
    """Licence files used when no corpus register is present."""
    files = [LICENSES / n for n in FALLBACK_RECOVERY_FILES if (LICENSES / n).is_file()]
    if not files:
        raise UserError(f"no default recovery text found (no corpora, nothing under {LICENSES}); run "
                        "scripts/fetch_corpora.py or pass --recover-data PATH")
    return files


@dataclass
class RecoveryData:
    """Token windows to train on, and where they came from (for the report)."""

    windows: list[torch.Tensor]
    files: list[str]
    tokens: int
    seq_len: int
    digest: str = ""
    notes: list[str] = field(default_factory=list)
    parts: list[dict] = field(default_factory=list)  # corpus parts (register, part, files, sha256) when mixed

    @classmethod
    def of(cls, windows: list[torch.Tensor], files: list[str], seq_len: int, parts: list[dict] | None = None):
        """The data with its token count and windows digest derived from the windows."""
        return cls(windows, files, sum(w.numel() for w in windows), seq_len, windows_digest(windows),
                   parts=parts or [])

    def to_dict(self) -> dict:
        record = {"files": self.files, "windows": len(self.windows), "tokens": self.tokens, "seq_len": self.seq_len,
                  "sha256": self.digest}
        return {**record, "parts": self.parts} if self.parts else record


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_disjoint(recovery_files: list[Path], eval_files: list[Path]) -> None:
    """Refuse recovery text that is (a link to, or a copy of) an evaluation file."""
    evaluated = {}
    for f in eval_files:
        for file in _text_files(Path(f)):
            evaluated[file.resolve()] = file
            evaluated[_file_digest(file)] = file
    for f in recovery_files:
        for file in _text_files(Path(f)):
            clash = evaluated.get(file.resolve()) or evaluated.get(_file_digest(file))
            if clash is not None:
                raise UserError(f"recovery text {file} is the evaluation text {clash}; recovery data must be disjoint "
                                "from the evaluation text: pass another --recover-data or --eval-text")


def check_parts_disjoint(source: CalibrationSource, eval_files: list[Path]) -> None:
    """Refuse default recovery parts drawn from a file that is evaluated (entries of one file are disjoint by part,
    but evaluating on the whole file would include the trained ones)."""
    evaluated = {Path(f).resolve(): Path(f) for path in eval_files for f in _text_files(Path(path))}
    for part in source.parts:
        for file in part.files:
            if Path(file).resolve() in evaluated:
                raise UserError(f"the default recovery text ({part.register}, training part) comes from "
                                f"{file}, which is also the evaluation text; pass --recover-data or another "
                                "--eval-text")


def _default_data(tokenizer, seq_len: int, eval_files: list[Path], windows_wanted: int, seed: int) -> RecoveryData:
    source = default_recovery_source()
    if source is None:
        log.info("no corpus register of %s present (run scripts/fetch_corpora.py): recovering on licence text %s",
                 ", ".join(DEFAULT_RECOVERY_REGISTERS), ", ".join(FALLBACK_RECOVERY_FILES))
        return _file_data(fallback_recovery_files(), tokenizer, seq_len, eval_files)
    check_parts_disjoint(source, eval_files)
    windows = source.windows(None, tokenizer, seq_len, windows_wanted, seed)
    record = source.record(seq_len, windows_wanted, seed)["parts"]
    files = [f"{p['register']}:training" for p in record]
    return RecoveryData.of(windows, files, seq_len, parts=record)


def _file_data(paths: list[Path], tokenizer, seq_len: int, eval_files: list[Path]) -> RecoveryData:
    check_disjoint(paths, eval_files)
    windows = token_windows(tokenizer, load_text(paths), seq_len, None, purpose="recovery")
    files = [str(f) for p in paths for f in _text_files(p)]
    return RecoveryData.of(windows, files, seq_len)


def load_recovery_data(spec: str | None, tokenizer, seq_len: int, eval_files: list[Path], dense_model=None,
                       self_windows: int = 32, seed: int = 0, windows_wanted: int = 400) -> RecoveryData:
    """The windows of `seq_len` tokens to train on: every non-overlapping one of the given text, `self_windows`
    sampled from the dense model, or (no `spec`) `windows_wanted` drawn equally from the default registers."""
    if spec is None:
        return _default_data(tokenizer, seq_len, eval_files, windows_wanted, seed)
    if spec == SELF_DATA:
        if dense_model is None:
            raise UserError("--recover-data self samples text from the dense model; it needs the source model")
        windows = self_generated_windows(dense_model, tokenizer, seq_len, self_windows, seed)
        files = [SELF_DATA]
        return RecoveryData.of(windows, files, seq_len)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"--recover-data {path} does not exist; pass a text file, a folder of them, "
                        "a .json/.jsonl file with a 'text' field, or 'self'")
    return _file_data([path], tokenizer, seq_len, eval_files)


def batch_indices(step: int, batch_size: int, count: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Window indices of one process's batch at `step`: an endless stream, reshuffled every epoch with `seed`.

    A pure function of its arguments, so a resumed run sees exactly the windows an uninterrupted one would."""
    start = (step * world + rank) * batch_size
    indices = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, count)
        order = list(range(count))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        indices.append(order[offset])
    return indices
