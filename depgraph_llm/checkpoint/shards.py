"""Safetensors shards, read lazily and written one at a time: the streaming path's checkpoint I/O.

Reading: `ShardReader` maps every tensor name to its file (model.safetensors.index.json, or the single
model.safetensors) and reads one tensor at a time with safe_open (memory-mapped, nothing else is loaded).
Writing: `ShardWriter` gathers tensors until a shard is full, writes it, and at the end names the shards as
Hugging Face does (model-00001-of-00003.safetensors + model.safetensors.index.json; one shard: model.safetensors).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from depgraph_llm.checkpoint.files import corrupt_weights_error
from depgraph_llm.errors import UserError

INDEX_NAME = "model.safetensors.index.json"
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool, "U8": torch.uint8}
SINGLE_NAME = "model.safetensors"


class ShardReader:
    """Tensor name -> tensor, read from the checkpoint's safetensors files on demand."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / SINGLE_NAME).is_file():
            try:
                with safe_open(self.folder / SINGLE_NAME, framework="pt") as handle:
                    weight_map = {name: SINGLE_NAME for name in handle.keys()}
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for damaged files
                raise corrupt_weights_error(self.folder, exc) from exc
        else:
            raise UserError(f"{self.folder} has no {SINGLE_NAME} or {INDEX_NAME}; streaming reads safetensors "
                            "checkpoints")
        self.weight_map: dict[str, str] = weight_map

    @classmethod
    def of_writer(cls, writer: "ShardWriter") -> "ShardReader":
        """A reader of the shards a writer has flushed so far (before they get their final names)."""
        reader = cls.__new__(cls)
        reader.folder = writer.folder
        reader.weight_map = {name: file for file, names, _ in writer._files for name in names}
        return reader

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype."""
        if name not in self.weight_map:
            raise UserError(f"{self.folder} has no tensor {name!r}; the checkpoint does not match its config.json")
        # opened per read: a handle kept open keeps every page it has read mapped, which counts as resident memory
        with safe_open(self.folder / self.weight_map[name], framework="pt") as handle:
            return handle.get_tensor(name)

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's floating-point tensors (the first one found)."""
        for name, file in self.weight_map.items():
            with safe_open(self.folder / file, framework="pt") as handle:
                dtype = _DTYPES.get(handle.get_slice(name).get_dtype())
            if dtype is not None and dtype.is_floating_point:
                return dtype
        return torch.float32

    def numel(self) -> int:
        """Elements stored over all tensors (read from the headers only)."""
        total = 0
        by_file: dict[str, list[str]] = {}
        for name, file in self.weight_map.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            with safe_open(self.folder / file, framework="pt") as handle:
                for name in names:
                    total += math.prod(handle.get_slice(name).get_shape())
        return total


class ShardWriter:
    """Write tensors into shards of at most `max_shard_bytes` (a tensor larger than that gets its own)."""

    def __init__(self, folder: Path, max_shard_bytes: int = 2 << 30) -> None:
        self.folder, self.max_shard_bytes = Path(folder), max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[tuple[str, list[str], int]] = []  # (temporary name, tensor names, bytes)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self._pending[name] = tensor.detach().contiguous().cpu()
        self._pending_bytes += size

    def flush(self) -> None:
        """Write the pending tensors as the next shard and drop them from memory."""
        if not self._pending:
            return
        name = f".shard-{len(self._files):05d}.safetensors"
        save_file(self._pending, str(self.folder / name), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.folder / name, 0o666 & ~umask)  # as save_pretrained's files (safetensors writes 0600)
        self._files.append((name, list(self._pending), self._pending_bytes))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Flush, give the shards their final names and write the index (none for a single shard)."""
        self.flush()
        total = len(self._files)
        if total == 1:
            (self.folder / self._files[0][0]).rename(self.folder / SINGLE_NAME)
            return [self.folder / SINGLE_NAME]
        weight_map, paths = {}, []
        for number, (temporary, names, _) in enumerate(self._files, start=1):
            final = f"model-{number:05d}-of-{total:05d}.safetensors"
            (self.folder / temporary).rename(self.folder / final)
            weight_map.update({n: final for n in names})
            paths.append(self.folder / final)
        index = {"metadata": {"total_size": sum(size for _, _, size in self._files)},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return paths
