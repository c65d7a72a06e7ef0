"""Fitness of a search profile without pruning: the model with the removed units masked (their consumer inputs
zeroed: down_proj's columns of removed MLP channels, o_proj's of removed heads) and dropped layers skipped, scored
by its KL divergence from the dense model on held-aside windows (not the calibration windows)."""
from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
from torch import nn

from depgraph_llm.errors import UserError
from depgraph_llm.graph.coupling import CouplingGraph
from depgraph_llm.graph.groups import Group, Slice
from depgraph_llm.planning.budget import top_k
from depgraph_llm.planning.search import LayerLevels, Profile
from depgraph_llm.planning.search_levels import LayerGroups

# which weight axis a module type reads its input along (transformers' Conv1D stores weights transposed)
INPUT_AXIS = {"Linear": 1, "Conv1D": 0}


def _consumers(model: nn.Module, group: Group) -> list[tuple[str, Slice]]:
    """(module name, slice) for every slice of the group on a module's input axis."""
    found = []
    for s in group.slices:
        module_name, _, leaf = s.param.rpartition(".")
        module = model.get_submodule(module_name)
        if leaf == "weight" and INPUT_AXIS.get(type(module).__name__) == s.axis:
            found.append((module_name, s))
    return found


class ProfileScorer:
    """Masks a model per profile through forward hooks and measures KL(dense || masked) per token."""

    def __init__(self, model: nn.Module, coupling: CouplingGraph, layers: list[LayerGroups],
                 levels: list[LayerLevels], scores: dict[str, torch.Tensor], windows: list[torch.Tensor]):
        if not windows:
            raise UserError("--schedule search needs held-aside calibration windows; pass more calibration text")
        self.model, self.layers, self.levels, self.scores, self.windows = model, layers, levels, scores, windows
        self.masks: dict[str, torch.Tensor] = {}
        self.dropped: set[int] = set()
        self.hooks = []
        self.consumers = {}
        for lg in layers:
            for group in (lg.mlp, lg.heads, lg.heads.nested if lg.heads else None):
                if group is not None:
                    self.consumers[group.name] = _consumers(model, group)
                    if not self.consumers[group.name]:
                        raise UserError(f"--schedule search cannot mask {group.name} (no consumer projection "
                                        "found); use --schedule uniform")
        for name in {m for found in self.consumers.values() for m, _ in found}:
            self.hooks.append(model.get_submodule(name).register_forward_pre_hook(self._mask_input(name)))
        decoder = model.get_submodule(coupling.layers_path)
        for lg in layers:
            self.hooks.append(decoder[lg.layer].register_forward_hook(self._skip(lg.layer), with_kwargs=True))
        self.masks.clear()
        with torch.no_grad():
            self.dense = [torch.log_softmax(self._logits(w), -1) for w in windows]
        self.dense_probs = [d.exp() for d in self.dense]

    def _mask_input(self, name: str) -> Callable:
        def hook(module, args):
            mask = self.masks.get(name)
            return None if mask is None else (args[0] * mask.to(args[0].dtype), *args[1:])
        return hook

    def _skip(self, layer: int) -> Callable:
        def hook(module, args, kwargs, output):
            if layer not in self.dropped:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook

    def _logits(self, window: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=window, use_cache=False).logits.float()

    @lru_cache(maxsize=4096)
    def _unit_mask(self, group_name: str, kept: int, nested: bool) -> torch.Tensor:
        scores = self.scores[group_name]
        if nested:
            mask = torch.zeros_like(scores, dtype=torch.bool)
            for row, values in enumerate(scores):
                mask[row, top_k(values, kept)] = True
            return mask
        mask = torch.zeros(len(scores), dtype=torch.bool)
        mask[top_k(scores, kept)] = True
        return mask

    def set_profile(self, profile: Profile) -> None:
        """Masks (consumer inputs) and skipped layers for `profile`."""
        axis: dict[str, torch.Tensor] = {}
        self.dropped = {lg.layer for lg, gone in zip(self.layers, profile.dropped) if gone}
        for lg, lv, m, h, gone in zip(self.layers, self.levels, profile.mlp, profile.heads, profile.dropped):
            if gone:
                continue
            units = []
            if lg.mlp is not None and lv.mlp[m] < lg.mlp.size:
                units.append((lg.mlp, self._unit_mask(lg.mlp.name, lv.mlp[m], False)))
            kv, q = lv.heads[h]
            if lg.heads is not None and kv < lg.heads.size:
                units.append((lg.heads, self._unit_mask(lg.heads.name, kv, False)))
            nested = lg.heads.nested if lg.heads is not None else None
            if nested is not None and q < nested.size:
                units.append((nested, self._unit_mask(nested.name, q, True)))
            for group, unit_mask in units:
                for module_name, s in self.consumers[group.name]:
                    mask = s.axis_mask(unit_mask)
                    axis[module_name] = mask if module_name not in axis else axis[module_name] & mask
        self.masks = axis

    @torch.no_grad()
    def __call__(self, profile: Profile, windows: int | None = None) -> float:
        """Mean KL(dense || masked) per token over the first `windows` held-aside windows (all when None)."""
        self.set_profile(profile)
        total, tokens = 0.0, 0
        for window, dense, probs in list(zip(self.windows, self.dense, self.dense_probs))[:windows]:
            logq = torch.log_softmax(self._logits(window), -1)
            total += float((probs * (dense - logq)).sum())
            tokens += dense.shape[0] * dense.shape[1]
        return total / tokens

    def close(self) -> None:
        """Remove the hooks: the model behaves as before."""
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        self.masks.clear()
        self.dropped.clear()

    def __enter__(self) -> "ProfileScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

