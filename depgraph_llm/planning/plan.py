"""The prune plan: which units of which groups are kept. Plain JSON, replayable on another machine."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from depgraph_llm.graph.coupling import CouplingGraph
from depgraph_llm.errors import UserError

PLAN_FORMAT = 1


@dataclass
class PrunePlan:
    """Kept unit indices per group, plus how and from what they were chosen."""

    model_hash: str
    model_type: str
    estimator: str
    schedule: str
    seed: int
    ratio_requested: float
    round_to: int
    params_before: int
    params_after: int
    keep: dict[str, list[int]] = field(default_factory=dict)
    keep_nested: dict[str, list[list[int]]] = field(default_factory=dict)
    removed_layers: list[int] = field(default_factory=list)
    reconstruct: str = "none"
    reconstruct_mode: str = ""
    reconstruct_report: dict = field(default_factory=dict)
    allocation: dict = field(default_factory=dict)
    format: int = PLAN_FORMAT

    @property
    def ratio_achieved(self) -> float:
        return 1.0 - self.params_after / self.params_before

    def to_json(self) -> str:
        data = asdict(self)
        data["ratio_achieved"] = round(self.ratio_achieved, 6)
        return json.dumps(data, indent=1)

    @classmethod
    def load(cls, path: str | Path) -> "PrunePlan":
        try:
            data = json.loads(Path(path).read_text())
            data.pop("ratio_achieved", None)
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise UserError(f"cannot read prune plan {path}: {exc}; pass a prune_plan.json written by depgraph-llm")


def unit_masks(coupling: CouplingGraph, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """Boolean keep masks over units: (size,) per group, (outer, size) per nested group."""
    masks: dict[str, torch.Tensor] = {}
    for group in coupling.groups:
        if group.name in plan.keep:
            masks[group.name] = _mask(group.size, plan.keep[group.name], group.name)
        nested = group.nested
        if nested is not None and nested.name in plan.keep_nested:
            rows = plan.keep_nested[nested.name]
            if len(rows) != group.size:
                raise UserError(f"plan entry {nested.name} has {len(rows)} rows, the model has {group.size} KV groups")
            masks[nested.name] = torch.stack([_mask(nested.size, row, nested.name) for row in rows])
    unknown = (set(plan.keep) | set(plan.keep_nested)) - set(masks)
    if unknown:
        raise UserError(f"plan names groups this model does not have: {sorted(unknown)[:3]}; was it made for another model?")
    return masks


def _mask(size: int, kept: list[int], name: str) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    if any(i < 0 or i >= size for i in kept):
        raise UserError(f"plan keeps an index outside 0..{size - 1} in {name}; was it made for another model?")
    mask[list(kept)] = True
    return mask


def axis_masks(coupling: CouplingGraph, plan: PrunePlan) -> dict[tuple[str, int], torch.Tensor]:
    """Keep masks over parameter axes, the AND of every group that touches the axis."""
    units = unit_masks(coupling, plan)
    masks: dict[tuple[str, int], torch.Tensor] = {}
    for group in coupling.groups:
        for g in (group, group.nested):
            if g is None or g.name not in units:
                continue
            for s in g.slices:
                mask = s.axis_mask(units[g.name])
                key = (s.param, s.axis)
                masks[key] = mask if key not in masks else masks[key] & mask
    return masks
