"""Make the saved config rebuild exactly the pruned model.

The pruned model is rebuilt from its rewritten config on the `meta` device and compared with the real one:
parameter shapes and the scalar attributes of every module (head_dim, split_size, embedding scales...). Stock
or per-layer config fields are tried first. What they cannot say, because the modeling code derives it from
other fields (GPT-2 and OPT derive head_dim = hidden / heads), is
recorded in `config.module_overrides` and replayed by the heterogeneous classes (models/heterogeneous.py)
when the checkpoint is loaded. A config that still rebuilds anything different is never written.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from depgraph_llm.models import ArchSpec
from depgraph_llm.errors import UserError
from depgraph_llm.removal.slim_config import is_heterogeneous, make_heterogeneous

log = logging.getLogger(__name__)

OVERRIDES_FIELD = "module_overrides"
Scalar = int | float | bool | tuple


@dataclass
class Mismatch:
    """How a model rebuilt from the config differs from the pruned one."""

    parameters: dict[str, list[int]] = field(default_factory=dict)    # name -> shape the pruned model has
    attributes: dict[str, dict[str, Scalar]] = field(default_factory=dict)  # module -> attr -> pruned value
    rebuilt_attributes: dict[str, dict[str, Scalar]] = field(default_factory=dict)  # ... -> value the config gives
    unmatched: list[str] = field(default_factory=list)  # parameters only one of the two models has
    buffers: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)  # name -> (pruned, rebuilt) shape

    def __bool__(self) -> bool:
        return bool(self.parameters or self.attributes or self.unmatched or self.buffers)

    @property
    def fatal(self) -> bool:
        """Differences no override can replay: missing parameters, buffers the config computes in another shape."""
        return bool(self.unmatched or self.buffers)

    def first(self) -> str:
        """The first difference, for a one-line error."""
        if self.unmatched:
            return f"parameter {self.unmatched[0]} exists in only one of the pruned and the rebuilt model"
        if self.buffers:
            name, (pruned, rebuilt) = next(iter(self.buffers.items()))
            return (f"buffer {name} is {tuple(pruned)} in the pruned model but {tuple(rebuilt)} when built from the "
                    "config (a width the modeling code derives, e.g. rotary head_dim = hidden / heads)")
        if self.parameters:
            name, shape = next(iter(self.parameters.items()))
            return f"{name} is {tuple(shape)} in the pruned model"
        module, attrs = next(iter(self.attributes.items()))
        attr, value = next(iter(attrs.items()))
        return f"{module}.{attr} is {value} in the pruned model"


class RebuildError(Exception):
    """The model class refuses the config (validators or modeling code raised)."""


def _scalars(module: nn.Module) -> dict[str, Scalar]:
    out = {}
    for name, value in vars(module).items():
        if name.startswith("_") or name == "training":
            continue
        if isinstance(value, (bool, int, float)) or (
                isinstance(value, tuple) and value and all(isinstance(v, int) for v in value)):
            out[name] = value
    return out


def rebuild_on_meta(model: nn.Module) -> nn.Module:
    """The model class built from the model's config, without allocating weights."""
    try:
        with torch.device("meta"):
            return type(model)(model.config)
    except Exception as exc:  # noqa: BLE001 - config validators and modeling code raise many types
        raise RebuildError(f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}") from exc


def find_mismatch(model: nn.Module) -> Mismatch:
    """Compare `model` with the model its config builds (raises RebuildError when the config does not build)."""
    rebuilt = rebuild_on_meta(model)
    mismatch = Mismatch()
    expected = {name: tuple(p.shape) for name, p in rebuilt.named_parameters()}
    actual = {name: tuple(p.shape) for name, p in model.named_parameters()}
    mismatch.unmatched = sorted(set(expected) ^ set(actual))
    mismatch.parameters = {name: list(shape) for name, shape in actual.items()
                           if name in expected and expected[name] != shape}
    rebuilt_buffers = {name: list(b.shape) for name, b in rebuilt.named_buffers()}
    for name, buffer in model.named_buffers():
        if name in rebuilt_buffers and rebuilt_buffers[name] != list(buffer.shape):
            mismatch.buffers[name] = (list(buffer.shape), rebuilt_buffers[name])
    rebuilt_modules = dict(rebuilt.named_modules())
    for name, module in model.named_modules():
        twin = rebuilt_modules.get(name)
        if twin is None or type(twin) is not type(module):
            continue
        theirs = _scalars(twin)
        differ = {attr: value for attr, value in _scalars(module).items() if attr in theirs and theirs[attr] != value}
        if differ:
            mismatch.attributes[name] = differ
            mismatch.rebuilt_attributes[name] = {attr: theirs[attr] for attr in differ}
    return mismatch


def _probe_ids(model: nn.Module) -> torch.Tensor:
    device = next(model.parameters()).device
    return (torch.arange(3, 11, device=device) % model.config.vocab_size).unsqueeze(0)


@torch.no_grad()
def check_runs(model: nn.Module) -> None:
    """The pruned model must run a short forward; a width the modeling code keeps in an attribute depgraph-llm does
    not update shows up here as a one-line error instead of a traceback later."""
    was_training = model.training
    model.eval()
    try:
        model(input_ids=_probe_ids(model))
    except Exception as exc:  # noqa: BLE001 - any failure inside the modeling code
        raise UserError(f"the pruned {model.config.model_type} fails to run ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160]}); its modeling code probably keeps a width in a module "
                        "attribute: name it in attention_attrs of its models/ entry (docs/new-architecture.md)") from exc
    finally:
        model.train(was_training)


@torch.no_grad()
def adopt_bookkeeping(model: nn.Module, mismatch: Mismatch) -> None:
    """Attributes the forward pass never reads (a stale `intermediate_size` on an MLP module) take the value the
    config gives; the rest stay in `mismatch`. Decided by probing: one short forward per attribute name with the
    rebuilt values must give bit-identical logits."""
    modules = dict(model.named_modules())
    # a module with non-persistent buffers may derive them from its attributes when weights are loaded (Gemma's
    # embed_scale buffer comes from scalar_embed_scale), which a forward on the pruned model cannot show
    candidates = {m: attrs for m, attrs in mismatch.attributes.items() if not modules[m]._non_persistent_buffers_set}
    names = sorted({attr for attrs in candidates.values() for attr in attrs})
    if not names:
        return
    was_training = model.training
    model.eval()
    probe = _probe_ids(model)
    try:
        reference = model(input_ids=probe).logits
        for attr in names:
            owners = [m for m, attrs in candidates.items() if attr in attrs]
            for m in owners:
                setattr(modules[m], attr, mismatch.rebuilt_attributes[m][attr])
            if _same_logits(model, probe, reference):
                for m in owners:
                    del mismatch.attributes[m][attr]
                    del mismatch.rebuilt_attributes[m][attr]
            else:
                for m in owners:
                    setattr(modules[m], attr, mismatch.attributes[m][attr])
    finally:
        model.train(was_training)
    mismatch.attributes = {m: attrs for m, attrs in mismatch.attributes.items() if attrs}
    mismatch.rebuilt_attributes = {m: attrs for m, attrs in mismatch.rebuilt_attributes.items() if attrs}


def _same_logits(model: nn.Module, probe: torch.Tensor, reference: torch.Tensor) -> bool:
    try:
        return torch.equal(model(input_ids=probe).logits, reference)
    except Exception:  # noqa: BLE001 - a wrong head_dim breaks a reshape: the attribute matters
        return False


def make_reproducible(model: nn.Module, spec: ArchSpec, widths: list[dict[str, int]],
                      dense_fields: dict[str, object], runnable: bool = True, adopt=None) -> None:
    """Ensure `model.config` rebuilds `model` exactly, adding module overrides (and the heterogeneous classes)
    when config fields cannot describe it; `dense_fields` are width fields to fall back to when the rewritten
    ones do not build (GPT-2 refuses 5 heads in a 64-wide model) or build what no override can fix (Falcon
    sizes its rotary table from hidden / heads)."""
    # a streamed model's decoder layers are shapes on `meta` (written already): it brings its own layer-by-layer
    # `adopt` probe, and the whole-model forward checks are skipped
    adopt = adopt or (adopt_bookkeeping if runnable else (lambda model, mismatch: None))
    if runnable:
        check_runs(model)
    try:
        mismatch = find_mismatch(model)
        adopt(model, mismatch)
        reason = mismatch.first() if mismatch.fatal else None
    except RebuildError as exc:
        mismatch, reason = None, str(exc)
    if mismatch is not None and not mismatch:
        return
    if reason is not None:
        log.info("the rewritten config cannot describe the model (%s): keeping the dense width fields, recording "
                 "the widths as module overrides", reason)
        for key, value in dense_fields.items():
            setattr(model.config, key, value)
        widths = []
    if not is_heterogeneous(model.config) or not widths:
        make_heterogeneous(model, spec, widths)
    setattr(model.config, OVERRIDES_FIELD, {})
    try:
        mismatch = find_mismatch(model)
        adopt(model, mismatch)
    except RebuildError as exc:
        raise _refusal(model, f"its config does not build ({exc})") from exc
    if mismatch.fatal:
        raise _refusal(model, mismatch.first())
    overrides = {"parameters": mismatch.parameters, "attributes": {
        module: {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()}
        for module, attrs in mismatch.attributes.items()}}
    setattr(model.config, OVERRIDES_FIELD, overrides)
    log.info("config records %d parameter shapes and %d modules' attributes it cannot derive",
             len(overrides["parameters"]), len(overrides["attributes"]))
    try:
        remaining = find_mismatch(model)
    except RebuildError as exc:
        raise _refusal(model, f"its config does not build ({exc})") from exc
    if remaining:
        raise _refusal(model, remaining.first())


def _refusal(model: nn.Module, reason: str) -> UserError:
    return UserError(f"the pruned {model.config.model_type} cannot be described by its config: {reason}; prune "
                     "other kinds (e.g. no --hidden-ratio) or see docs/new-architecture.md")
