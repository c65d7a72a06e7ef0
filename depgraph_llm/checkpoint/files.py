"""Slim checkpoints on disk: atomic writes (temp dir beside the target, then rename) and content hashes."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from depgraph_llm.errors import UserError

log = logging.getLogger(__name__)


def check_not_source(out: Path, sources: Iterable[str | Path | None], flag: str = "--out") -> None:
    """Refuse an output path that is, lies inside, or contains a source (writing it would replace or alter it)."""
    target = Path(out).expanduser().resolve()
    for source in sources:
        if source is None:
            continue
        origin = Path(source).expanduser().resolve()
        relation = ("is" if target == origin else "is inside" if origin in target.parents
                    else "contains" if target in origin.parents else None)
        if relation:
            raise UserError(f"{flag} {out} {relation} the source {origin}; the source is never written to, choose "
                            "an output path outside it")


def check_output_dir(out: Path, overwrite: bool, sources: Iterable[str | Path | None] = ()) -> None:
    """Refuse a source folder (or a path inside or around it), a file in its place, and a non-empty existing
    --out unless --overwrite."""
    check_not_source(out, sources)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} already exists and is not empty; pass --overwrite or choose another folder")


def check_free_space(out: Path, needed_bytes: int) -> None:
    """Fail before writing anything when the target's filesystem cannot hold `needed_bytes` (+10%)."""
    probe = out if out.exists() else out.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes * 1.1:
        raise UserError(f"not enough disk space for {out}: need about {needed_bytes / 2**20:.0f} MiB, "
                        f"{free / 2**20:.0f} MiB free; free some space or choose another --out")


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `out`; on success it replaces `out`, on any failure it is deleted."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        if out.exists():
            check_output_dir(out, overwrite)
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=False, default=str) + "\n")


def weights_hash(model_dir: Path) -> str:
    """sha256 over the checkpoint's safetensors files (sorted by name): identifies the source model."""
    digest = hashlib.sha256()
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir} has no .safetensors weights; convert the checkpoint to safetensors first")
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint_config(folder: Path) -> dict:
    """config.json of a checkpoint folder, or a one-line error naming what is wrong."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} has no config.json; pass a checkpoint folder")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}; fix or replace config.json") from exc


def corrupt_weights_error(folder: Path, exc: Exception) -> UserError:
    """The one-line error for unreadable safetensors files."""
    return UserError(f"cannot read the weights in {folder} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                     "the checkpoint must contain complete .safetensors files")
