"""What a plan needs so that `apply` can replay a reconstructed prune: the calibration windows, rebuilt from the
plan's record of their source and checked against the digest of the windows the prune used."""
from __future__ import annotations

import hashlib

import torch

from depgraph_llm.calibration.sources import CalibrationSource, file_source_of, self_source
from depgraph_llm.calibration.corpora import corpus_part
from depgraph_llm.errors import UserError
from depgraph_llm.calibration.self_generation import SelfRecipe


def windows_digest(windows: list[torch.Tensor]) -> str:
    """sha256 of token windows (their ids as int64, in order)."""
    digest = hashlib.sha256()
    for window in windows:
        digest.update(window.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()


def calibration_record(source: CalibrationSource, windows: list[torch.Tensor], seq_len: int, seed: int) -> dict:
    """The source's own record plus the digest of the windows drawn from it (what a replay must reproduce)."""
    return {**source.record(seq_len, len(windows), seed), "windows_sha256": windows_digest(windows)}


def source_from_record(record: dict) -> CalibrationSource:
    """The calibration source a record describes; refuses text that changed since (by its sha256)."""
    kind = record.get("source")
    if kind == "self":
        return self_source(SelfRecipe(**record["recipe"]))
    if kind not in ("mixed", "files"):
        raise UserError(f"the plan's calibration record names an unknown source {kind!r}; recreate it with `prune`")
    parts = []
    for part in record.get("parts", []):
        try:
            rebuilt = (corpus_part(part["register"], part["part"]) if kind == "mixed"
                       else file_source_of(part["files"]).parts[0])
        except (FileNotFoundError, KeyError, OSError, UserError) as exc:
            where = part.get("register") if kind == "mixed" else ", ".join(part.get("files", [])[:3])
            raise UserError(f"the plan's calibration text {where} is not on this machine ({exc}); run "
                            "scripts/fetch_corpora.py or restore the files, or rerun `prune`") from exc
        if rebuilt.sha256 != part["sha256"]:
            where = part["register"] if kind == "mixed" else ", ".join(part["files"][:3])
            raise UserError(f"the calibration text {where} changed since the plan was made (sha256 "
                            f"{part['sha256'][:12]}... now {rebuilt.sha256[:12]}...); restore it or rerun `prune`")
        parts.append(rebuilt)
    return CalibrationSource(tuple(parts), label=kind, hash_ordered=kind == "mixed")


def replay_windows(record: dict, model, tokenizer) -> list[torch.Tensor]:
    """The calibration windows of a recorded prune, drawn again and checked by digest."""
    if not record.get("windows_sha256"):
        raise UserError("the plan has no record of its calibration windows (made before plans recorded them); "
                        "rerun `prune` with the same options instead of `apply`")
    source = source_from_record(record)
    windows = source.windows(model, tokenizer, record["seq_len"], record["windows"], record["seed"])
    if windows_digest(windows) != record["windows_sha256"]:
        raise UserError("the calibration windows drawn again differ from the ones the plan was made with (another "
                        "tokenizer?); rerun `prune` with the same options instead of `apply`")
    return windows
