"""Model -> exported FX graph of ATen ops, traced on the meta device so no weights are touched."""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)
TRACE_BATCH, TRACE_SEQ_LEN = 2, 13  # odd sizes that cannot be confused with channel widths


@dataclass
class Trace:
    """An exported graph plus the map from its placeholders to parameter names."""

    graph: torch.fx.Graph
    param_names: dict[str, str]
    seconds: float


def meta_copy(model: nn.Module) -> nn.Module:
    """A weightless copy of `model` (same class, same config) on the meta device."""
    config = copy.deepcopy(model.config)
    config.use_cache = False
    if getattr(config, "_experts_implementation", None) == "eager":
        # the eager experts loop over the experts that received tokens (data-dependent): export cannot follow it;
        # batched_mm computes the same function with static shapes (gather each token's expert weights)
        config._experts_implementation = "batched_mm"
    with torch.device("meta"):
        clone = type(model)(config)
    clone.eval()
    return clone


def trace_model(model: nn.Module) -> Trace:
    """Export `model`'s forward on token ids with torch.export (non-strict) on a meta copy."""
    meta_model = model if _is_meta(model) else meta_copy(model)
    meta_model.config.use_cache = False
    vocab = int(getattr(meta_model.config, "vocab_size", 2))
    input_ids = torch.zeros(TRACE_BATCH, TRACE_SEQ_LEN, dtype=torch.long, device="meta") % max(vocab, 1)
    start = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(meta_model, args=(input_ids,), kwargs={"use_cache": False}, strict=False)
    seconds = time.perf_counter() - start
    log.info("traced %s in %.1fs (%d nodes)", type(model).__name__, seconds, len(program.graph.nodes))
    return Trace(program.graph, dict(program.graph_signature.inputs_to_parameters), seconds)


def _is_meta(model: nn.Module) -> bool:
    return all(p.device.type == "meta" for p in model.parameters())
