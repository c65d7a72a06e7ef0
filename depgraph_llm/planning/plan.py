"""The prune plan: which units of which groups are kept. Plain JSON, replayable on another machine."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from depgraph_llm.graph.coupling import CouplingGraph
from depgraph_llm.errors import UserError
from depgraph_llm.graph.groups import NAME_SUFFIX, GroupKind

VOCAB_CHOOSER = "calibration-token-counts"  # --vocab-keep keeps the tokens the calibration text produces
PRUNABLE_KINDS = (GroupKind.CHANNELS, GroupKind.HEADS, GroupKind.HIDDEN, GroupKind.VOCAB, GroupKind.EXPERTS,
                  GroupKind.EXPERT_CHANNELS)  # layers: removed_layers

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
    reconstruct_anchor: float = 0.0  # refit pulled toward the original weights (recovery/solvers.py); 0: plain LS
    expert_reconstruct: str = "drop"  # routed experts removed: drop / router refit / merge (recovery/experts.py)
    expert_reconstruct_report: dict = field(default_factory=dict)
    allocation: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)  # --schedule search: the chosen profile and its fitness
    chosen_by: dict[str, str] = field(default_factory=dict)  # group -> what re-chose its units, if not `estimator`
    calibration: dict = field(default_factory=dict)  # the calibration source and windows digest (calibration/record.py)
    hidden_method: str = "select"  # hidden channels: selected, or "rotate" (PCA rotation first, recovery/rotation.py)
    rotation_report: dict = field(default_factory=dict)
    format: int = PLAN_FORMAT

    @property
    def ratio_achieved(self) -> float:
        return 1.0 - self.params_after / self.params_before

    def kept_vocabulary(self) -> list[int] | None:
        """The token ids the plan keeps, if it prunes the vocabulary (its group is named by NAME_SUFFIX)."""
        suffix = NAME_SUFFIX[GroupKind.VOCAB]
        vocab = [ids for name, ids in self.keep.items() if name == suffix or name.endswith("." + suffix)]
        return vocab[0] if vocab else None

    def chosen_by_kind(self, coupling: CouplingGraph) -> dict[str, str]:
        """Per group kind, what chose the kept units: the estimator, or what replaced its choice (OBS
        reconstruction re-chooses MLP channels), calibration token counts for the vocabulary, the depth metric."""
        nested = {g.nested.name: g for g in coupling.groups if g.nested is not None}
        kinds = {g.name: g.kind.value for g in coupling.groups}
        choosers: dict[str, set[str]] = {}
        for name in [*self.keep, *self.keep_nested]:
            kind = kinds.get(name) or (nested[name].kind.value if name in nested else "unknown")
            default = VOCAB_CHOOSER if kind == GroupKind.VOCAB.value else self.estimator
            choosers.setdefault(kind, set()).add(self.chosen_by.get(name, default))
        if self.removed_layers:
            choosers[GroupKind.LAYER.value] = {self.schedule}
        return {kind: ", ".join(sorted(names)) for kind, names in sorted(choosers.items())}

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

    def check_against(self, coupling: CouplingGraph, model_type: str | None = None) -> None:
        """Refuse (one line, naming the group) a plan this model cannot replay: unknown or non-prunable groups,
        kept indices that are not sorted, unique, in range and non-empty, ragged query-head rows, bad layers."""
        if self.format != PLAN_FORMAT:
            raise UserError(f"plan format {self.format!r} is not {PLAN_FORMAT}; recreate the plan with this version")
        if model_type is not None and self.model_type != model_type:
            raise UserError(f"the plan was made for model_type {self.model_type!r}, the model is {model_type!r}; "
                            "pass the model the plan was made from")
        groups = coupling.by_name()
        nested = {g.nested.name: g for g in coupling.groups if g.nested is not None}
        for field_name, entries in (("keep", self.keep), ("keep_nested", self.keep_nested)):
            if not isinstance(entries, dict):
                raise UserError(f"plan field {field_name} must map group names to kept indices; recreate the plan")
        for name, kept in self.keep.items():
            group = groups.get(name)
            if group is None:
                raise UserError(f"plan names group {name!r}, which this model does not have; was it made for "
                                "another model?")
            if group.kind not in PRUNABLE_KINDS:
                raise UserError(f"plan entry {name} is a {group.kind.value} group, whose units are not kept by index; "
                                "list removed layers in removed_layers")
            check_indices(kept, group.size, name)
        for name, rows in self.keep_nested.items():
            outer = nested.get(name)
            if outer is None:
                raise UserError(f"plan names nested group {name!r}, which this model does not have; was it made for "
                                "another model?")
            if not isinstance(rows, list) or len(rows) != outer.size:
                raise UserError(f"plan entry {name} must have one row per KV group ({outer.size}); recreate the plan")
            for row in rows:
                check_indices(row, outer.nested.size, name)
            if len({len(row) for row in rows}) > 1:
                raise UserError(f"plan entry {name} keeps different numbers of query heads per KV group "
                                f"({sorted({len(row) for row in rows})}); every KV group must keep the same number")
        layers = len(coupling.of_kind(GroupKind.LAYER))
        check_indices(self.removed_layers, layers, "removed_layers", allow_empty=True)
        if layers and len(self.removed_layers) >= layers:
            raise UserError("the plan removes every decoder layer; keep at least one")


def unit_masks(coupling: CouplingGraph, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """Boolean keep masks over units: (size,) per group, (outer, size) per nested group."""
    plan.check_against(coupling)
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


def check_indices(indices, size: int, name: str, allow_empty: bool = False) -> None:
    """Kept (or removed) unit indices must be a sorted list of unique integers in 0..size-1 (and not empty)."""
    if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise UserError(f"plan entry {name} must be a list of integer indices; recreate the plan")
    if not indices and not allow_empty:
        raise UserError(f"plan entry {name} keeps no unit; keep at least one")
    repeated = [i for i, count in Counter(indices).items() if count > 1]
    if repeated:
        raise UserError(f"plan entry {name} lists index {min(repeated)} more than once; each index once, ascending")
    if any(a > b for a, b in zip(indices, indices[1:])):
        raise UserError(f"plan entry {name} lists its indices out of order; sort them ascending")
    if indices and (indices[0] < 0 or indices[-1] >= size):
        raise UserError(f"plan entry {name} has index {indices[0] if indices[0] < 0 else indices[-1]} outside "
                        f"0..{size - 1}; was it made for another model?")


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
