"""The model's parameter names over a checkpoint stored in another layout.

transformers 5 keeps some modules fused in memory that checkpoints store split: a mixture of experts holds
`mlp.experts.gate_up_proj` (experts x 2I x H) where the files hold `experts.0.gate_proj.weight`, ... (and
Mixtral's files say `block_sparse_moe`, `w1`/`w2`/`w3`). `from_pretrained` converts while it loads, with the
conversion mapping registered for the model class. The streaming path reads one layer at a time, so it applies
the same mapping tensor by tensor: `StoredLayout.get(model_name)` reads the stored tensors behind one model
parameter and runs transformers' own conversion operations on them (stack the experts, concatenate gate and up).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from depgraph_llm.errors import UserError

from .shards import ShardReader


@dataclass(frozen=True)
class _Converted:
    """One model parameter built from stored tensors: per source pattern, its stored names in order."""

    sources: tuple[tuple[str, tuple[str, ...]], ...]  # (source pattern, stored names)
    operations: tuple


def _conversions(model: nn.Module) -> tuple[list, list]:
    """The (renamings, converters) transformers applies when it loads `model`'s class from a checkpoint."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # an older transformers: checkpoints are stored as the model names them
        return [], []
    transforms = get_model_conversion_mapping(model)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def _natural_key(name: str) -> list:
    """Expert 10 after expert 9: numbers compare as numbers."""
    return [int(part) if part.isdigit() else part for part in name.split(".")]


class StoredLayout:
    """`get(name)` / `name in layout` over the model's own parameter names, whatever names the shards store."""

    def __init__(self, reader: ShardReader, model: nn.Module) -> None:
        self.reader = reader
        self.direct: dict[str, str] = {}
        self.converted: dict[str, _Converted] = {}
        renamings, converters = _conversions(model)
        if not renamings and not converters:
            self.direct = {name: name for name in reader.weight_map}
            return
        from transformers.core_model_loading import rename_source_key

        gathered: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        owner: dict[str, object] = {}
        for stored in reader.weight_map:
            target, pattern = rename_source_key(stored, renamings, converters)
            if pattern is None:
                self.direct[target] = stored
                continue
            gathered[target][pattern].append(stored)
            owner[target] = next(c for c in converters if pattern in c.source_patterns)
        for target, by_pattern in gathered.items():
            converter = owner[target]
            self.converted[target] = _Converted(
                tuple((p, tuple(sorted(by_pattern[p], key=_natural_key))) for p in converter.source_patterns
                      if p in by_pattern),
                tuple(converter.operations))

    def __contains__(self, name: str) -> bool:
        return name in self.direct or name in self.converted

    def get(self, name: str) -> torch.Tensor:
        """The model's tensor `name`, in the stored dtype."""
        if name in self.direct:
            return self.reader.get(self.direct[name])
        if name not in self.converted:
            raise UserError(f"{self.reader.folder} has no tensor {name!r}; the checkpoint does not match its "
                            "config.json")
        entry = self.converted[name]
        values: dict = {pattern: [self.reader.get(stored) for stored in names] for pattern, names in entry.sources}
        patterns = [pattern for pattern, _ in entry.sources]
        for operation in entry.operations:
            values = operation.convert(values, source_patterns=patterns, target_patterns=[name], full_layer_name=name)
        if len(values) != 1:
            raise UserError(f"cannot rebuild {name!r} from {self.reader.folder}'s stored tensors for streaming; "
                            "prune this checkpoint with --in-memory")
        return next(iter(values.values()))
