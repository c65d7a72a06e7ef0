"""Recovery text: local files, folders, .json/.jsonl (through `datasets`) or `self`; disjoint from evaluation text."""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from depgraph_llm.calibration import LICENSES, _text_files, load_text, self_generated_windows, token_windows
from depgraph_llm.errors import UserError

SELF_DATA = "self"
# Licence texts in neither DEFAULT_CALIBRATION_FILES nor DEFAULT_EVAL_FILES (GFDL-1.2 is left out: it is almost
# the same text as the evaluated GFDL-1.3; the GPL/LGPL/GFDL names without a version are links to evaluated files).
DEFAULT_RECOVERY_FILES = ("GPL-2", "LGPL-2", "LGPL-2.1")


def default_recovery_files() -> list[Path]:
    """The recovery text used when --recover-data is not given (one place, so the default is easy to switch)."""
    files = [LICENSES / n for n in DEFAULT_RECOVERY_FILES if (LICENSES / n).is_file()]
    if not files:
        raise UserError(f"no default recovery text found under {LICENSES}; pass --recover-data PATH")
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

    def to_dict(self) -> dict:
        return {"files": self.files, "windows": len(self.windows), "tokens": self.tokens, "seq_len": self.seq_len,
                "sha256": self.digest}


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


def windows_digest(windows: list[torch.Tensor]) -> str:
    """sha256 of the token windows (identifies the data a resumed run must see again)."""
    digest = hashlib.sha256()
    for window in windows:
        digest.update(window.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()


def load_recovery_data(spec: str | None, tokenizer, seq_len: int, eval_files: list[Path], dense_model=None,
                       self_windows: int = 32, seed: int = 0) -> RecoveryData:
    """Every non-overlapping window of `seq_len` tokens of the recovery text (or `self_windows` sampled ones)."""
    if spec == SELF_DATA:
        if dense_model is None:
            raise UserError("--recover-data self samples text from the dense model; it needs the source model")
        windows = self_generated_windows(dense_model, tokenizer, seq_len, self_windows, seed)
        files = [SELF_DATA]
    else:
        paths = [Path(spec).expanduser()] if spec else default_recovery_files()
        for path in paths:
            if not path.exists():
                raise UserError(f"--recover-data {path} does not exist; pass a text file, a folder of them, "
                                "a .json/.jsonl file with a 'text' field, or 'self'")
        check_disjoint(paths, eval_files)
        text = load_text(paths)
        windows = token_windows(tokenizer, text, seq_len, None, purpose="recovery")
        files = [str(f) for p in paths for f in _text_files(p)]
    return RecoveryData(windows, files, sum(w.numel() for w in windows), seq_len, windows_digest(windows))


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
