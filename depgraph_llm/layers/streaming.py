"""The streaming source and sink: the model is a skeleton whose decoder layers live on `meta`; each layer is
materialised from the safetensors shards when the pipeline reaches it and dropped back to `meta` (keeping its
current, possibly sliced, shapes) when it leaves. The sink slices each finished layer and writes it straight into
the output shards, so host memory holds one layer whatever the depth."""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from depgraph_llm.checkpoint.shards import ShardReader, ShardWriter
from depgraph_llm.checkpoint.stored_layout import StoredLayout
from depgraph_llm.graph.coupling import CouplingGraph, find_layers_path
from depgraph_llm.models import ArchSpec
from depgraph_llm.planning.plan import PrunePlan
from depgraph_llm.removal.apply import slice_layer
from depgraph_llm.job.stage_memory import release_free_heap

from .pipeline import LayerSink
from .spill import ActivationStore

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _owners(root: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    owners: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for module in root.modules():
        for attr, param in module._parameters.items():
            if param is not None:
                owners[id(param)].append((module, attr))
    return owners


def _assign(root: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Replace parameters of `root` (by local name) with new tensors, at every module that holds them."""
    params = dict(root.named_parameters())
    owners = _owners(root)
    for name, tensor in values.items():
        new = nn.Parameter(tensor, requires_grad=False)
        for module, attr in owners[id(params[name])]:
            setattr(module, attr, new)


def skeleton(folder: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model class built from the folder's config with every parameter on `meta` (buffers such as rotary
    tables are real: they are computed from the config, not loaded)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from depgraph_llm.checkpoint.loading import load_config

    config = load_config(Path(folder), trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # as from_pretrained does: a tied head is the embedding, stored once
    return model.eval()


class StreamingSource:
    """Decoder layers read from the shards of `folder` one at a time, computed in `dtype`; the rest of the model
    (embeddings, final norm, head) is loaded once."""

    def __init__(self, folder: Path, dtype: torch.dtype | None = None, device: torch.device | None = None,
                 trust_remote_code: bool = False, activation_budget: int | None = None,
                 spill_dir: Path | None = None) -> None:
        self.folder = Path(folder)
        self.activations = ActivationStore(activation_budget, spill_dir)  # streams beyond the budget go to disk
        self.reader = ShardReader(self.folder)
        self.source_dtype = self.reader.dtype()
        self.dtype = dtype or self.source_dtype
        self.device = device  # where layers are materialised (the rest of the model stays on the CPU)
        self.model = skeleton(self.folder, self.dtype, trust_remote_code)
        self.layout = StoredLayout(self.reader, self.model)  # the model's names over the stored ones (fused experts)
        self.zero_params: set[str] = set()  # parameters the job added (zero biases): made, not read from the shards
        self.layers_path = find_layers_path(self.model)
        self.layers: nn.ModuleList = self.model.get_submodule(self.layers_path)
        self.restore_outside()

    def _outside_names(self) -> list[str]:
        prefix = f"{self.layers_path}."
        return [name for name, _ in self.model.named_parameters() if not name.startswith(prefix)]

    def park_outside(self) -> None:
        """Parameters outside the layers back to `meta` (the shards still hold them): while only decoder layers
        run, the embeddings and head (2.1 GB at Llama-3.1-8B widths) need not be resident."""
        _assign(self.model, {name: torch.empty(p.shape, dtype=p.dtype, device="meta")
                             for name, p in self.model.named_parameters() if name in set(self._outside_names())})

    def restore_outside(self) -> None:
        """Read the parameters outside the layers (again) from the shards, where they are on `meta`."""
        params = dict(self.model.named_parameters())
        _assign(self.model, {name: self._read(name) for name in self._outside_names()
                             if params[name].device.type == "meta"})

    def _read(self, name: str) -> torch.Tensor:
        tensor = self.layout.get(name)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def __len__(self) -> int:
        return len(self.layers)

    def load(self, index: int) -> nn.Module:
        layer = self.layers[index]
        prefix = f"{self.layers_path}.{index}."
        _assign(layer, {name: (torch.zeros(p.shape, dtype=self.dtype) if prefix + name in self.zero_params
                               else self._read(prefix + name)).to(self.device or "cpu")
                        for name, p in layer.named_parameters()})
        return layer

    def release(self, index: int, layer: nn.Module) -> None:
        """Back to `meta`, keeping the current shapes (the final config step reads them)."""
        _assign(layer, {name: torch.empty(p.shape, dtype=p.dtype, device="meta")
                        for name, p in layer.named_parameters()})
        release_free_heap()


class ShardSink(LayerSink):
    """Slice each finished layer, renumber it past the removed layers and write it (in `out_dtype`)."""

    def __init__(self, writer: ShardWriter, coupling: CouplingGraph, plan: PrunePlan, spec: ArchSpec,
                 out_dtype: torch.dtype) -> None:
        self.writer, self.coupling, self.plan, self.spec, self.out_dtype = writer, coupling, plan, spec, out_dtype
        self.removed = set(plan.removed_layers)
        self.written = 0

    def write(self, index: int, name: str, layer: nn.Module) -> None:
        if index in self.removed:
            return
        slice_layer(layer, index, self.coupling, self.plan, self.spec)
        new_prefix = f"{self.coupling.layers_path}.{index - sum(1 for r in self.removed if r < index)}."
        for local, tensor in layer.state_dict().items():
            value = tensor.to(self.out_dtype) if tensor.is_floating_point() else tensor
            self.writer.add(new_prefix + local, value)
        self.written += 1


def streamed_adopt(reader: ShardReader, layers_path: str, dtype: torch.dtype):
    """`adopt_bookkeeping` for a skeleton whose layers are written: each layer with stale attributes is read back
    from the shards and run alone on a probe; an attribute the layer's output does not depend on (bit for bit)
    takes the value the config gives."""
    from depgraph_llm.removal.overrides import _probe_ids

    from .source import capture_inputs, first_call

    @torch.no_grad()
    def adopt(model: nn.Module, mismatch) -> None:
        modules = dict(model.named_modules())
        candidates = {m: attrs for m, attrs in mismatch.attributes.items()
                      if not modules[m]._non_persistent_buffers_set and m.startswith(f"{layers_path}.")}
        if not candidates:
            return
        layers: nn.ModuleList = model.get_submodule(layers_path)
        probe = _probe_ids(model)
        unread: dict[tuple[str, str], bool] = {}
        inputs = None
        for index, layer in enumerate(layers):
            prefix = f"{layers_path}.{index}"
            mine = {m: attrs for m, attrs in candidates.items() if m == prefix or m.startswith(prefix + ".")}
            if not mine:
                continue
            _assign(layer, {n: reader.get(f"{prefix}.{n}").to(dtype) for n, _ in layer.named_parameters()})
            try:
                if inputs is None:
                    hidden, args, kwargs = first_call(model, layers_path, len(layers), probe)
                    as_tuple = isinstance(layer(hidden, *args, **kwargs), tuple)
                    inputs = capture_inputs(model, layers_path, len(layers), [probe], as_tuple)
                args, kwargs = inputs.arguments[index][0]

                def run():
                    out = layer(inputs.hidden[0], *args, **kwargs)
                    return out[0] if isinstance(out, tuple) else out

                reference = run()
                for module_name, attrs in mine.items():
                    for attr in attrs:
                        setattr(modules[module_name], attr, mismatch.rebuilt_attributes[module_name][attr])
                        try:
                            same = torch.equal(run(), reference)
                        except Exception:  # noqa: BLE001 - a wrong width breaks a reshape: the attribute matters
                            same = False
                        setattr(modules[module_name], attr, mismatch.attributes[module_name][attr])
                        unread[(module_name, attr)] = same
            finally:
                _assign(layer, {n: torch.empty(p.shape, dtype=p.dtype, device="meta")
                                for n, p in layer.named_parameters()})
        for attr in sorted({a for attrs in candidates.values() for a in attrs}):
            owners = [m for m, attrs in candidates.items() if attr in attrs]
            if all(unread.get((m, attr), False) for m in owners):
                for m in owners:
                    setattr(modules[m], attr, mismatch.rebuilt_attributes[m][attr])
                    del mismatch.attributes[m][attr]
                    del mismatch.rebuilt_attributes[m][attr]
        mismatch.attributes = {m: a for m, a in mismatch.attributes.items() if a}
        mismatch.rebuilt_attributes = {m: a for m, a in mismatch.rebuilt_attributes.items() if a}

    return adopt
