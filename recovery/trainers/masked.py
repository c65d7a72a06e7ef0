"""`masked`: mask-aware fine-tuning (SlimGPT's "fine-tune with the sparse mask"). The dense-shaped model holds the
slim weights at their kept positions and zeros elsewhere; the plan's masks stay at zero in the weights *and* the
gradients (optionally only LoRA adapters train, masked too), and `finish` removes them with the same `apply` path
the pruner uses. The dense-shaped model then computes exactly what the slim one does, so this equals training the
slim model, which the tests check. A plan that pruned the vocabulary trains the dense-shaped model restricted to its
kept tokens (`RestrictedVocabulary`: the slim tokenizer's ids index the kept rows, the softmax runs over them only),
so the removed rows take no softmax mass and get no gradient."""
from __future__ import annotations

from torch import nn
import torch

from depgraph_llm.errors import UserError
from depgraph_llm.graph.coupling import CouplingGraph
from depgraph_llm.graph.groups import GroupKind
from depgraph_llm.planning.plan import PrunePlan, axis_masks
from depgraph_llm.planning.vocab_cost import RestrictedVocabulary
from depgraph_llm.removal.apply import apply_plan

from .base import Trainer, TrainSettings, register
from .lora import lora_config


def check_maskable(coupling: CouplingGraph, plan: PrunePlan) -> None:
    """Refuse plans whose masked dense model would not compute what the slim one does."""
    for kind, why in ((GroupKind.HIDDEN, "norms average over the zeroed hidden channels"),
                      (GroupKind.EXPERTS, "a zeroed router row still takes routing mass")):
        for group in coupling.of_kind(kind):
            if group.name in plan.keep and len(plan.keep[group.name]) < group.size:
                raise UserError(f"--recover masked cannot hold this plan's {kind.value} pruning at zero ({why}); "
                                "use --recover lora or full")


def slim_name(dense_name: str, layers_path: str | None, kept_layers: list[int]) -> str | None:
    """The slim model's name for a dense parameter (decoder layers renumbered; None for a removed layer)."""
    prefix = f"{layers_path}." if layers_path else None
    if prefix is None or not dense_name.startswith(prefix):
        return dense_name
    index, _, rest = dense_name[len(prefix):].partition(".")
    if not index.isdigit():
        return dense_name
    if int(index) not in kept_layers:
        return None
    return f"{prefix}{kept_layers.index(int(index))}.{rest}"


def kept_layer_indices(coupling: CouplingGraph, plan: PrunePlan) -> list[int]:
    """Dense indices of the decoder layers the plan keeps, in order."""
    removed = set(plan.removed_layers)
    return [i for i in range(len(coupling.of_kind(GroupKind.LAYER))) if i not in removed]


def element_masks(model: nn.Module, coupling: CouplingGraph, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """Per dense parameter, a keep mask of its full shape (all False in removed layers); kept-everywhere omitted."""
    params = dict(model.named_parameters())
    kept_layers = kept_layer_indices(coupling, plan)
    masks: dict[str, torch.Tensor] = {}
    for (name, axis), keep in axis_masks(coupling, plan).items():
        if bool(keep.all()):
            continue
        shape = [1] * params[name].dim()
        shape[axis] = -1
        mask = masks.get(name, torch.ones(params[name].shape, dtype=torch.bool))
        masks[name] = mask & keep.reshape(shape)
    for name, param in params.items():
        if slim_name(name, coupling.layers_path, kept_layers) is None:
            masks[name] = torch.zeros(param.shape, dtype=torch.bool)
    return masks


@torch.no_grad()
def load_slim_into_dense(dense: nn.Module, slim: nn.Module, coupling: CouplingGraph, plan: PrunePlan) -> None:
    """Write the slim model's weights into the kept positions of the dense-shaped model; zero the rest."""
    masks = element_masks(dense, coupling, plan)
    slim_params = dict(slim.named_parameters())
    kept_layers = kept_layer_indices(coupling, plan)
    dense_params = dict(dense.named_parameters())
    expected = {slim_name(n, coupling.layers_path, kept_layers) for n in dense_params} - {None}
    if expected != set(slim_params):
        extra = sorted(set(slim_params) ^ expected)[:3]
        raise UserError(f"the slim checkpoint's parameters do not match its plan on the source model ({extra}); "
                        "pass the model the checkpoint was pruned from")
    for name, param in dense_params.items():
        target = slim_name(name, coupling.layers_path, kept_layers)
        if target is None:
            param.zero_()
            continue
        source = slim_params[target]
        if name not in masks:
            param.copy_(source)
            continue
        mask = masks[name]
        index = [mask.any(dim=tuple(d for d in range(mask.dim()) if d != axis)).nonzero().flatten()
                 for axis in range(mask.dim())]
        param.zero_()
        param[torch.meshgrid(*index, indexing="ij")] = source


@register("masked")
class MaskedTrainer(Trainer):
    """Trains the dense-shaped model with the plan's masks held at zero; `finish` applies the plan."""

    def __init__(self, coupling: CouplingGraph, plan: PrunePlan, spec) -> None:
        check_maskable(coupling, plan)
        self.coupling, self.plan, self.spec = coupling, plan, spec
        self.masks: dict[nn.Parameter, torch.Tensor] = {}
        self.lora = False
        self.kept_vocab = plan.kept_vocabulary()

    def _hold(self, param: nn.Parameter, mask: torch.Tensor) -> None:
        mask = mask.to(param.device, param.dtype)
        self.masks[param] = mask
        param.register_hook(lambda grad, m=mask: grad * m)
        with torch.no_grad():
            param.mul_(mask)

    def prepare(self, model: nn.Module, settings: TrainSettings) -> nn.Module:
        model = self._held(model, settings)
        return model if self.kept_vocab is None else RestrictedVocabulary(model, self.kept_vocab)

    def _held(self, model: nn.Module, settings: TrainSettings) -> nn.Module:
        masks = element_masks(model, self.coupling, self.plan)
        self.lora = settings.masked_lora
        if not self.lora:
            for name, param in model.named_parameters():
                param.requires_grad_(True)
                if name in masks:
                    self._hold(param, masks[name])
            return model
        from peft import get_peft_model

        for param in model.parameters():
            param.requires_grad_(False)
        modules = dict(model.named_modules())
        peft_model = get_peft_model(model, lora_config(settings))
        for name, module in peft_model.base_model.model.named_modules():
            if not hasattr(module, "lora_A") or f"{name}.weight" not in masks or name not in modules:
                continue
            mask = masks[f"{name}.weight"]  # rows x columns, an outer product of two axis masks
            rows, cols = mask.any(dim=1), mask.any(dim=0)
            for adapter in module.lora_A:
                self._hold(module.lora_A[adapter].weight, cols.unsqueeze(0).expand_as(module.lora_A[adapter].weight))
                self._hold(module.lora_B[adapter].weight, rows.unsqueeze(1).expand_as(module.lora_B[adapter].weight))
        return peft_model

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        for param, mask in self.masks.items():
            param.mul_(mask)

    def finish(self, model: nn.Module) -> nn.Module:
        if isinstance(model, RestrictedVocabulary):
            model = model.model
        if self.lora:
            model = model.merge_and_unload()
        for param in model.parameters():
            param.requires_grad_(False)
        apply_plan(model, self.coupling, self.plan, self.spec)
        return model
