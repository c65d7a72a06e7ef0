"""The physical remover: slice parameters along pruned axes, fix module attributes, rewrite the config."""
from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch import nn

from depgraph_llm.models import ArchSpec
from depgraph_llm.graph.coupling import CouplingGraph, module_path_of
from depgraph_llm.errors import UserError
from depgraph_llm.graph.groups import GroupKind
from depgraph_llm.planning.plan import PrunePlan, axis_masks
from depgraph_llm.removal.experts import clip_top_k, expert_counts, fix_expert_attrs
from depgraph_llm.removal.overrides import make_reproducible
from depgraph_llm.planning.vocab import remap_config_ids
from depgraph_llm.removal.slim_config import WIDTH_KEYS, is_uniform, make_heterogeneous, width_fields

log = logging.getLogger(__name__)


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (module, attribute) that holds each parameter; tied weights have several."""
    owners: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None:
                owners[id(param)].append((module, attr))
    return owners


def mask_model(model: nn.Module, coupling: CouplingGraph, plan: PrunePlan) -> None:
    """Zero the pruned units in place (the dense model then computes what the slim one does)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for (name, axis), keep in axis_masks(coupling, plan).items():
            shape = [1] * params[name].dim()
            shape[axis] = -1
            params[name].mul_(keep.reshape(shape).to(params[name].dtype))


def apply_plan(model: nn.Module, coupling: CouplingGraph, plan: PrunePlan, spec: ArchSpec) -> nn.Module:
    """Physically remove what `plan` prunes from `model` (in place) and rewrite `model.config`: every decoder
    layer's slice step, then the final step (the rest of the model and the config)."""
    if coupling.layers_path is not None:
        masks = axis_masks(coupling, plan)
        for index, layer in enumerate(model.get_submodule(coupling.layers_path)):
            slice_layer(layer, index, coupling, plan, spec, masks)
    return finish_plan(model, coupling, plan, spec)


def _slice_parameters(root: nn.Module, prefix: str, masks: dict[tuple[str, int], torch.Tensor],
                      skip: str | None = None) -> None:
    """Slice the parameters of `root` (named `prefix` + local name) along their pruned axes, in place; names
    starting with `skip` are left alone (already sliced)."""
    params = dict(root.named_parameters())
    owners = _owners(root)
    by_param: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for (name, axis), keep in masks.items():
        local = name[len(prefix):] if name.startswith(prefix) else None
        if local in params and not (skip and name.startswith(skip)) and not bool(keep.all()):
            by_param[local][axis] = keep.nonzero().flatten()
    for name, axes in by_param.items():
        old = params[name]
        data = old.data
        for axis, index in sorted(axes.items()):
            data = data.index_select(axis, index.to(data.device))  # a device map keeps weights on their GPU
        new = nn.Parameter(data.contiguous(), requires_grad=old.requires_grad)
        for module, attr in owners[id(old)]:
            setattr(module, attr, new)


def slice_layer(layer: nn.Module, index: int, coupling: CouplingGraph, plan: PrunePlan, spec: ArchSpec,
                masks: dict[tuple[str, int], torch.Tensor] | None = None) -> nn.Module:
    """The per-layer step: slice decoder layer `index` (a module on its own, e.g. streamed from disk) and set its
    modules' sizes and head counts; the layer then computes what it will in the slim model."""
    masks = axis_masks(coupling, plan) if masks is None else masks
    _slice_parameters(layer, f"{coupling.layers_path}.{index}.", masks)
    _fix_module_sizes(layer)
    counts = head_counts(coupling, plan).get(index)
    if counts is not None:
        module_path = module_path_of(counts["module"], coupling.layers_path)
        _set_attention_attrs(layer, module_path[len(f"{coupling.layers_path}.{index}."):], counts, spec)
    return layer


def finish_plan(model: nn.Module, coupling: CouplingGraph, plan: PrunePlan, spec: ArchSpec,
                runnable: bool = True, adopt=None) -> nn.Module:
    """The final step, once every decoder layer is sliced: the parameters outside the layers (embeddings, final
    norm, head), module attributes, removed layers and the config (`runnable` False: the layers are shapes on
    `meta`, as in the streaming path, so the config is checked without running the model)."""
    masks = axis_masks(coupling, plan)
    dense_fields = {f: getattr(model.config, f) for f in _width_field_names(spec) if hasattr(model.config, f)}
    _slice_parameters(model, "", masks, skip=f"{coupling.layers_path}." if coupling.layers_path else None)
    _fix_module_sizes(model)
    hidden_change = _hidden_change(coupling, plan)
    if hidden_change:
        _fix_parameterless_norms(model, *hidden_change)
        if spec.after_hidden_pruning:
            spec.after_hidden_pruning(model, *hidden_change)
    _fix_attention_attrs(model, coupling, plan, spec)
    fix_expert_attrs(model, coupling, plan, spec)
    _remove_layers(model, coupling, plan, spec)
    widths = _rewrite_config(model, coupling, plan, spec)
    make_reproducible(model, spec, widths, dense_fields, runnable, adopt)
    return model


def _hidden_change(coupling: CouplingGraph, plan: PrunePlan) -> tuple[int, int] | None:
    """(old, new) hidden width when the plan removes hidden channels."""
    hidden = coupling.of_kind(GroupKind.HIDDEN)
    if not hidden or len(plan.keep.get(hidden[0].name, range(hidden[0].size))) == hidden[0].size:
        return None
    return hidden[0].size, len(plan.keep[hidden[0].name])


def _fix_parameterless_norms(model: nn.Module, old_hidden: int, new_hidden: int) -> None:
    """Norms without a weight (OLMo's LayerNorm) have nothing to slice; they normalise over the new width."""
    for module in model.modules():
        if getattr(module, "weight", None) is None and getattr(module, "normalized_shape", None) in (
                (old_hidden,), [old_hidden]):
            module.normalized_shape = (new_hidden,)


def _width_field_names(spec: ArchSpec) -> list[str]:
    return [f for f in (*width_fields(spec).values(), spec.head_dim_field) if f]


def _fix_module_sizes(model: nn.Module) -> None:
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = weight.shape
        elif weight.dim() == 2 and isinstance(getattr(module, "nf", None), int):  # transformers' Conv1D (GPT-2)
            module.nx, module.nf = weight.shape
        elif isinstance(module, nn.Embedding):
            module.num_embeddings, module.embedding_dim = weight.shape
        elif isinstance(module, nn.LayerNorm):
            module.normalized_shape = tuple(weight.shape)


def head_counts(coupling: CouplingGraph, plan: PrunePlan) -> dict[int, dict[str, int]]:
    """Per layer: kept q_heads, kv_heads and q_per_kv after the plan."""
    counts = {}
    for group in coupling.of_kind(GroupKind.HEADS):
        if group.layer is None:
            continue
        kv = len(plan.keep.get(group.name, range(group.size)))
        if group.nested is not None:
            rows = plan.keep_nested.get(group.nested.name)
            q_per_kv = len(rows[0]) if rows else group.nested.size
        else:
            q_per_kv = group.queries_per_unit
        head_dim = group.unit_width // group.queries_per_unit  # a Falcon unit spans its group's query heads
        counts[group.layer] = {"kv_heads": kv, "q_per_kv": q_per_kv, "q_heads": kv * q_per_kv,
                               "q_width": kv * q_per_kv * head_dim, "kv_width": kv * head_dim,
                               "module": group.name.rsplit(".", 1)[0]}
    return counts


def _fix_attention_attrs(model: nn.Module, coupling: CouplingGraph, plan: PrunePlan, spec: ArchSpec) -> None:
    for layer, counts in head_counts(coupling, plan).items():
        _set_attention_attrs(model, module_path_of(counts["module"], coupling.layers_path), counts, spec)


def _set_attention_attrs(root: nn.Module, module_path: str, counts: dict, spec: ArchSpec) -> None:
    try:
        attention = root.get_submodule(module_path)
    except AttributeError:
        return
    for attr, which in spec.attention_attrs.items():
        if isinstance(getattr(attention, attr, None), int):
            setattr(attention, attr, counts[which])


def _remove_layers(model: nn.Module, coupling: CouplingGraph, plan: PrunePlan, spec: ArchSpec) -> None:
    if not plan.removed_layers:
        return
    layers: nn.ModuleList = model.get_submodule(coupling.layers_path)
    removed = set(plan.removed_layers)
    if len(removed) >= len(layers):
        raise UserError("the plan removes every decoder layer; keep at least one")
    kept = [block for i, block in enumerate(layers) if i not in removed]
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    parent_path, _, attr = coupling.layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, nn.ModuleList(kept))
    config = model.config
    for field in spec.per_layer_fields:
        values = getattr(config, field, None)
        if isinstance(getattr(type(config), field, None), property):  # derived (Mamba): follows the layer count
            continue
        if isinstance(values, list) and len(values) == len(layers):
            setattr(config, field, [v for i, v in enumerate(values) if i not in removed])


def layer_widths(coupling: CouplingGraph, plan: PrunePlan | None = None) -> list[dict[str, int]]:
    """Per kept layer: MLP width and head counts after the plan (of the dense model without one)."""
    plan = plan or PrunePlan("", "", "", "", 0, 0.0, 1, 1, 1)
    heads = head_counts(coupling, plan)
    experts = expert_counts(coupling, plan)
    widths = []
    layers = sorted({g.layer for g in coupling.groups if g.layer is not None})
    for layer in layers:
        if layer in plan.removed_layers:
            continue
        row: dict[str, int] = {"layer": layer}
        for g in coupling.groups:
            if g.layer == layer and g.kind == GroupKind.CHANNELS:
                row["mlp"] = len(plan.keep.get(g.name, range(g.size)))
        if layer in heads:
            row.update({k: v for k, v in heads[layer].items() if k not in ("module", "q_width", "kv_width")})
        row.update({k: v for k, v in experts.get(layer, {}).items() if k != "module"})
        widths.append(row)
    return widths


def _rewrite_config(model: nn.Module, coupling: CouplingGraph, plan: PrunePlan, spec: ArchSpec) -> list[dict]:
    """Stock config fields when every layer has the same widths and the stock validators accept them;
    otherwise transformers' per_layer_config layout with our heterogeneous classes (slim_config.py)."""
    config = model.config
    widths = layer_widths(coupling, plan)
    first = widths[0] if widths else {}
    if spec.head_dim_field and isinstance(getattr(config, spec.q_heads_field, None), int) and not isinstance(
            getattr(type(config), spec.head_dim_field, None), property):  # Falcon derives it in a read-only property
        # explicit, since pruning heads or hidden channels would change a head_dim derived as hidden / heads
        head_dim = getattr(config, spec.head_dim_field, None) or config.hidden_size // getattr(config, spec.q_heads_field)
        setattr(config, spec.head_dim_field, head_dim)
    hidden_change = _hidden_change(coupling, plan)
    if hidden_change and isinstance(getattr(type(config), "head_dim", None), property):
        # Falcon: head_dim = hidden / heads in a read-only property, which rotary tables are sized from; a new
        # width would change them on reload, sometimes without changing their shape (48 -> 44 channels)
        raise UserError(f"{config.model_type} derives head_dim from hidden_size in a read-only config property, so "
                        "its hidden width cannot change; prune MLP channels, heads or layers instead")
    if hidden_change:
        old_hidden = getattr(config, spec.hidden_field)
        for field in (spec.hidden_field, *spec.hidden_alias_fields):
            if getattr(config, field, None) == old_hidden:
                setattr(config, field, hidden_change[1])
    setattr(config, spec.layers_field, len(widths) if widths else getattr(config, spec.layers_field))
    vocab = [plan.keep[g.name] for g in coupling.of_kind(GroupKind.VOCAB) if g.name in plan.keep]
    if vocab:
        mapping = {old: new for new, old in enumerate(vocab[0])}
        config.vocab_size = len(vocab[0])
        remap_config_ids(config, mapping)
        embedding = model.get_input_embeddings()
        if getattr(embedding, "padding_idx", None) is not None:
            embedding.padding_idx = mapping.get(embedding.padding_idx)
        if getattr(model, "generation_config", None) is not None:
            remap_config_ids(model.generation_config, mapping)
    clip_top_k(config, spec, widths)
    fields = width_fields(spec, config)
    uniform = {fields[k]: first[k] for k in WIDTH_KEYS if k in first and fields[k]}
    if is_uniform(widths) and stock_config_accepts(config, uniform):
        for field, value in uniform.items():
            setattr(config, field, value)
    else:
        make_heterogeneous(model, spec, widths)
    return widths


def stock_config_accepts(config, updates: dict[str, int]) -> bool:
    """Would the config's own class (and its validators, e.g. hidden % heads) accept these field updates?"""
    try:
        candidate = type(config)(**{**config.to_dict(), **updates})
        validate = getattr(candidate, "validate", None)
        if callable(validate):
            validate()
    except Exception as exc:  # noqa: BLE001 - validators raise ValueError or huggingface_hub's own error types
        log.debug("config rejects %s: %s", updates, exc)
        return False
    return True
