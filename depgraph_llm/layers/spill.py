"""Calibration activations beyond a memory budget go to disk: a list of tensors stored one file each and read back
one at a time, so a layer's input and output streams cost one batch of memory each."""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch


class SpilledList(Sequence):
    """Append-only list of tensors kept in files under `folder`; indexing reads one back."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="stream-", dir=folder))
        self.paths: list[Path] = []

    def append(self, tensor: torch.Tensor) -> None:
        path = self.folder / f"{len(self.paths):06d}.pt"
        torch.save(tensor.detach().cpu().contiguous(), path)
        self.paths.append(path)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return torch.load(self.paths[index], weights_only=True)

    def __len__(self) -> int:
        return len(self.paths)

    def __del__(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class ActivationStore:
    """Decides where a stream of `count` tensors of `tensor_bytes` each goes: memory within the budget, else disk."""

    def __init__(self, budget_bytes: int | None, folder: Path | None = None) -> None:
        self.budget_bytes, self.folder = budget_bytes, folder
        self.spilled = 0

    def new(self, count: int, tensor_bytes: int):
        if self.budget_bytes is None or count * tensor_bytes <= self.budget_bytes:
            return []
        self.spilled += 1
        return SpilledList(self.folder or Path(tempfile.gettempdir()))
