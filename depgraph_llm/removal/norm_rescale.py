"""Norms over a selected hidden width (`--hidden-ratio` with `--hidden-method select`).

An RMSNorm divides by the root mean square over its channels. Sliced to the k kept hidden channels it averages
over k instead of d, so on a stream whose removed channels carry nothing its output is sqrt(k / d) times the dense
norm's, in every layer and compounding through the residual stream. Scaling the norm's gain by sqrt(d / k) makes
the slim model compute exactly what the dense one does on such a stream; where the removed channels carry some of
the energy (the least important ones, so little of it) it is the closer of the two. The epsilon stays as it is: it
is shared through the config with norms over other axes (q/k norms), and its effect is of order eps / mean(x^2).
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from depgraph_llm.graph.coupling import CouplingGraph
from depgraph_llm.graph.groups import GroupKind

log = logging.getLogger(__name__)
EPS_ATTRIBUTES = ("variance_epsilon", "eps")


def hidden_axis_weights(coupling: CouplingGraph) -> list[str]:
    """Names of the weights sliced along the hidden group's first axis (norm gains among them; which are norms
    is decided on the modules themselves, which a streamed layer has only when it is sliced)."""
    return [s.param for group in coupling.of_kind(GroupKind.HIDDEN) for s in group.slices
            if s.axis == 0 and s.param.endswith(".weight")]


def _gain_kind(module: nn.Module) -> str | None:
    """'gain' for g * x / rms(x), 'one_plus' for (1 + g) * x / rms(x) (Gemma), None for anything else."""
    eps = next((float(getattr(module, a)) for a in EPS_ATTRIBUTES if hasattr(module, a)), None)
    if eps is None or getattr(module, "bias", None) is not None:
        return None
    weight = module.weight.detach().float()
    x = torch.randn(2, 3, weight.shape[0], generator=torch.Generator().manual_seed(0)) * 3
    base = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    out = module(x.to(module.weight.dtype)).float()
    for kind, gain in (("gain", weight), ("one_plus", 1 + weight)):
        if torch.allclose(out, base * gain, rtol=1e-4, atol=1e-5):
            return kind
    return None


@torch.no_grad()
def rescale_sliced_norms(root: nn.Module, prefix: str, names: list[str], old_width: int, new_width: int) -> list[str]:
    """Multiply the output of every norm of `root` named in `names` (full names; `root`'s own start with
    `prefix`), already sliced to `new_width`, by sqrt(old_width / new_width). Returns the norms left as they were
    (not RMSNorm-like: a LayerNorm's centering does not scale this way)."""
    scale = math.sqrt(old_width / new_width)
    modules = dict(root.named_modules())
    skipped = []
    for name in names:
        if not name.startswith(prefix):
            continue
        module_name = name[len(prefix):].rpartition(".")[0]
        module = modules.get(module_name)
        if module is None or isinstance(module, (nn.Linear, nn.Embedding)) or module.weight.dim() != 1:
            continue
        kind = _gain_kind(module)
        if kind == "gain":
            module.weight.mul_(scale)
        elif kind == "one_plus":
            module.weight.copy_((1 + module.weight) * scale - 1)
        else:
            skipped.append(name)
    if skipped:
        log.warning("hidden pruning: %d norm(s) are not RMSNorm-like and keep their gain (%s)", len(skipped),
                    skipped[0])
    return skipped
