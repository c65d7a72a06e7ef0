"""Hidden-dimension pruning by rotation (`--hidden-method rotate`): SliceGPT's computational invariance with one
orthogonal Q for the whole residual stream, so the slim checkpoint keeps a stock config.

In a pre-norm model (Llama family) every norm that reads the residual stream x computes g * x / rms(x). With g
folded into the linears that read the norm, the norm is weight-free and commutes with any orthogonal Q
(rms(Q^T x) = rms(x)); rotating every writer of the stream (embeddings, o_proj / down_proj outputs) by Q^T and every
reader (q/k/v, gate/up, lm_head inputs) by Q leaves the function unchanged. Q is the PCA basis of the calibration
residual stream (every layer's input and the last layer's output, each token scaled to unit length, float64), so
the first k rotated coordinates carry most of the stream; slicing the others away is the hidden pruning.

An RMSNorm over k coordinates of a stream that lives in them equals the d-wide one with weight sqrt(d/k) and epsilon
eps * d / k, both stock fields (the norm weight and `rms_norm_eps`), so the sliced model computes exactly what the
d-wide model with the discarded directions zeroed computes. SliceGPT's per-layer Qs would need a d x d shortcut
matrix on every residual connection, which no stock config can express; one Q needs none.

Tied embeddings cannot hold both the rotated embedding E Q and the norm-folded head E diag(g) Q: the head is untied
before planning (`untie_head`), so the planner counts its vocab x k parameters against `--ratio`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from depgraph_llm.errors import UserError
from depgraph_llm.graph.coupling import CouplingGraph
from depgraph_llm.graph.groups import Group, GroupKind
from depgraph_llm.layers import InMemorySource, LayerCallback, LayerPipeline, LayerStep
from depgraph_llm.planning.plan import PrunePlan

log = logging.getLogger(__name__)

EPS_ATTRIBUTES = ("variance_epsilon", "eps")  # where an RMSNorm module keeps its epsilon
EPS_CONFIG_FIELDS = ("rms_norm_eps",)          # the config field that sets it
INVARIANCE_TOLERANCE = 1e-3  # relative logit change the full-width rotation may cause before it is refused
CHOOSER = "pca-rotation"


# ---- the math: pure functions on tensors ---------------------------------------------------------------------------

def fold_norm(reader: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
    """A linear's weight (out, d) that reads g * y, rewritten to read y: W diag(g)."""
    return reader * norm_weight.to(reader.dtype)[None, :]


def pca_basis(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, eigenvalues): the eigenvectors of a symmetric Gram as columns, by decreasing eigenvalue; each column's
    largest-magnitude entry is made positive so the basis is deterministic."""
    values, vectors = torch.linalg.eigh(gram.double())
    order = torch.argsort(values, descending=True, stable=True)
    values, vectors = values[order], vectors[:, order]
    peak = vectors.abs().argmax(0)
    signs = torch.sign(vectors[peak, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1
    return vectors * signs[None, :], values


def rotate_reader(weight: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A reader (out, d) of the rotated stream Q^T x: W Q."""
    return weight @ q.to(weight.dtype)


def rotate_writer(weight: torch.Tensor, q: torch.Tensor, keep: int) -> torch.Tensor:
    """A writer (d, ...) into the rotated stream: Q^T W, with the directions past `keep` zeroed."""
    rotated = q.to(weight.dtype).T @ weight
    rotated[keep:] = 0
    return rotated


def rotate_embedding(weight: torch.Tensor, q: torch.Tensor, keep: int) -> torch.Tensor:
    """Embedding rows (vocab, d) in the rotated stream: E Q, with the directions past `keep` zeroed."""
    rotated = weight @ q.to(weight.dtype)
    rotated[:, keep:] = 0
    return rotated


def sliced_norm(eps: float, width: int, keep: int) -> tuple[float, float]:
    """(weight, epsilon) of an RMSNorm over `keep` coordinates that equals the weight-free one over `width`
    coordinates on a stream confined to them: x / sqrt(|x|^2/width + eps) = s x / sqrt(|x|^2/keep + eps')."""
    return math.sqrt(width / keep), eps * width / keep


def normalised_gram(states: torch.Tensor) -> torch.Tensor:
    """sum over tokens of u u^T with u = x / |x| (float64): what the norms reading the stream see."""
    x = states.reshape(-1, states.shape[-1]).double()
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return x.T @ x


# ---- which parameters play which part ------------------------------------------------------------------------------

@dataclass
class ResidualRoles:
    """The hidden group's parameters by what they do to the residual stream."""

    group: str
    width: int
    embeddings: list[str] = field(default_factory=list)   # (vocab, d): write token vectors
    writers: list[str] = field(default_factory=list)      # linear weights / biases whose rows are the stream
    readers: list[str] = field(default_factory=list)      # linear weights whose columns read a norm of the stream
    norms: dict[str, list[str]] = field(default_factory=dict)  # norm module -> the reader weights it feeds


def untie_head(model: nn.Module) -> bool:
    """Give the LM head its own copy of tied embeddings (config says untied); True if it was tied."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not embeddings.weight:
        return False
    head.weight = nn.Parameter(embeddings.weight.detach().clone())
    model.config.tie_word_embeddings = False
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    text.tie_word_embeddings = False
    return True


def residual_roles(model: nn.Module, coupling: CouplingGraph, probe: torch.Tensor) -> ResidualRoles:
    """Classify the hidden group's slices; which norm feeds which reader comes from one probe forward (a reader's
    input is its norm's output tensor). Anything else refuses rotation with a one-line error."""
    group = _hidden_group(coupling)
    modules = dict(model.named_modules())
    roles = ResidualRoles(group.name, group.size)
    norm_modules = {}
    for s in group.slices:
        module_name, _, attr = s.param.rpartition(".")
        module = modules[module_name]
        if isinstance(module, nn.Embedding) and s.axis == 1:
            roles.embeddings.append(s.param)
        elif isinstance(module, nn.Linear) and attr == "weight" and s.axis == 1:
            roles.readers.append(s.param)
        elif isinstance(module, nn.Linear) and s.axis == 0:
            roles.writers.append(s.param)
        elif attr in ("weight", "bias") and s.axis == 0 and getattr(module, attr).dim() == 1:  # a norm
            norm_modules[module_name] = module
        else:
            raise UserError(f"--hidden-method rotate: {s.param} (axis {s.axis}) is neither an embedding, a linear "
                            "reading or writing the residual stream, nor a norm; use --hidden-method select")
    for name, module in norm_modules.items():
        check_rms_norm(name, module)
    roles.norms = _norm_readers(model, norm_modules, roles.readers, probe)
    return roles


def _hidden_group(coupling: CouplingGraph) -> Group:
    hidden = coupling.of_kind(GroupKind.HIDDEN)
    if not hidden:
        raise UserError("--hidden-method rotate: this model has no prunable hidden dimension; see `depgraph-llm graph`")
    return hidden[0]


def norm_eps(module: nn.Module) -> float | None:
    """An RMSNorm module's epsilon, from the attribute names it may use."""
    return next((float(getattr(module, a)) for a in EPS_ATTRIBUTES if hasattr(module, a)), None)


@torch.no_grad()
def check_rms_norm(name: str, module: nn.Module) -> None:
    """Refuse a norm that is not g * x / sqrt(mean(x^2) + eps) (LayerNorm's centering, Gemma's 1 + g)."""
    eps = norm_eps(module)
    weight = module.weight.detach().float()
    x = torch.randn(2, 3, weight.shape[0], generator=torch.Generator().manual_seed(0)) * 3
    if eps is not None and getattr(module, "bias", None) is None:
        expected = weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        if torch.allclose(module(x.to(module.weight.dtype)).float(), expected, rtol=1e-4, atol=1e-5):
            return
    raise UserError(f"--hidden-method rotate: {name} ({type(module).__name__}) is not an RMSNorm g * x / rms(x) "
                    "(LayerNorm's centering and bias, or a 1 + g weight, are not supported yet); "
                    "use --hidden-method select")


@torch.no_grad()
def _norm_readers(model: nn.Module, norms: dict[str, nn.Module], readers: list[str],
                  probe: torch.Tensor) -> dict[str, list[str]]:
    """norm module -> reader weights whose input is that norm's output, seen on one probe forward."""
    modules = dict(model.named_modules())
    outputs: dict[tuple[int, tuple], str] = {}
    inputs: dict[str, tuple[int, tuple]] = {}
    pinned: list[torch.Tensor] = []  # alive until the end, so no later tensor reuses a recorded address

    def record(name: str, out: torch.Tensor) -> None:
        pinned.append(out)
        outputs.setdefault(_key(out), name)

    handles = [m.register_forward_hook(lambda m, a, out, n=n: record(n, out)) for n, m in norms.items()]
    for weight in readers:
        name = weight.rpartition(".")[0]
        handles.append(modules[name].register_forward_pre_hook(
            lambda m, args, w=weight: None if inputs.setdefault(w, _key(args[0])) else None))
    try:
        model(input_ids=probe, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    fed: dict[str, list[str]] = {n: [] for n in norms}
    for weight in readers:
        norm = outputs.get(inputs.get(weight))
        if norm is None:
            raise UserError(f"--hidden-method rotate: {weight} reads the residual stream without a norm in between "
                            "(only pre-norm models are rotation-invariant); use --hidden-method select")
        fed[norm].append(weight)
    return fed


def _key(tensor: torch.Tensor) -> tuple[int, tuple]:
    """Identifies a tensor and its views (lm_head reads hidden_states[:, slice]): storage address, last dim."""
    return tensor.untyped_storage().data_ptr(), tuple(tensor.shape[-1:])


# ---- the model steps ------------------------------------------------------------------------------------------------

@torch.no_grad()
def fold_norms(model: nn.Module, roles: ResidualRoles) -> None:
    """Every norm's weight into the readers it feeds; the norms become weight-free (weight = 1)."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    for norm_name, readers in roles.norms.items():
        norm = modules[norm_name]
        for weight in readers:
            params[weight].copy_(fold_norm(params[weight].double(), norm.weight.double()).to(params[weight].dtype))
        norm.weight.fill_(1.0)


class ResidualPCA(LayerCallback):
    """Gram of the unit-normalised residual stream entering every decoder layer and leaving the last (float64)."""

    def __init__(self) -> None:
        self.gram: torch.Tensor | None = None
        self.layers = 0

    def start(self, model: nn.Module, layers_path: str) -> None:
        self.layers = len(model.get_submodule(layers_path))

    def _add(self, stream: list[torch.Tensor]) -> None:
        for states in stream:
            gram = normalised_gram(states).cpu()
            self.gram = gram if self.gram is None else self.gram + gram

    def after_layer(self, step: LayerStep) -> None:
        self._add(step.stream)
        if step.index == self.layers - 1:
            self._add(step.outputs)


@torch.no_grad()
def rotate_and_slice(model: nn.Module, roles: ResidualRoles, q: torch.Tensor, keep: int) -> None:
    """Rotate every writer and reader by Q (norms folded first) and zero the stream's directions past `keep`: the
    model stays d wide and computes what the sliced one will (`finish_sliced_norms` after slicing)."""
    params = dict(model.named_parameters())
    for name in roles.embeddings:
        params[name].copy_(rotate_embedding(params[name].double(), q, keep).to(params[name].dtype))
    for name in roles.writers:
        params[name].copy_(rotate_writer(params[name].double(), q, keep).to(params[name].dtype))
    for name in roles.readers:
        params[name].copy_(rotate_reader(params[name].double(), q).to(params[name].dtype))


@torch.no_grad()
def discard_directions(model: nn.Module, roles: ResidualRoles, keep: int) -> None:
    """Zero the rotated stream's coordinates past `keep` in every writer (the readers then see zeros there)."""
    params = dict(model.named_parameters())
    for name in roles.embeddings:
        params[name][:, keep:] = 0
    for name in roles.writers:
        params[name][keep:] = 0


@torch.no_grad()
def finish_sliced_norms(model: nn.Module, roles: ResidualRoles, keep: int) -> None:
    """After slicing to `keep` coordinates: norm weight sqrt(d/k), epsilon eps * d / k (modules and config)."""
    modules = dict(model.named_modules())
    for norm_name in roles.norms:
        norm = modules[norm_name]
        scale, new_eps = sliced_norm(norm_eps(norm), roles.width, keep)
        norm.weight.fill_(scale)
        setattr(norm, next(a for a in EPS_ATTRIBUTES if hasattr(norm, a)), new_eps)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in EPS_CONFIG_FIELDS:
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, sliced_norm(getattr(config, name), roles.width, keep)[1])


@dataclass
class RotationReport:
    """What the rotation did, for prune_report.json."""

    kept: int
    width: int
    explained: float = 0.0          # share of the (normalised) stream's energy in the kept directions
    invariance_error: float = 0.0   # max |logit change| / max |logit| of the full-width rotation on a probe

    def to_dict(self) -> dict:
        return {k: (round(v, 8) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@torch.no_grad()
def rotate_residual(model: nn.Module, coupling: CouplingGraph, plan: PrunePlan, batches: list[torch.Tensor],
                    device: torch.device | None = None) -> tuple[ResidualRoles, RotationReport]:
    """Fold the norms, compute Q from the calibration stream (one layer-pipeline pass), rotate, and zero the
    discarded directions; the plan's hidden group then keeps the first k rotated coordinates."""
    if coupling.layers_path is None:
        raise UserError("--hidden-method rotate runs layer by layer, but no decoder-layer list was found")
    if not batches:
        raise UserError("--hidden-method rotate needs calibration text; pass --calibration FILE or self")
    probe = batches[0][:1, :32]
    roles = residual_roles(model, coupling, probe)
    keep = len(plan.keep.get(roles.group, range(roles.width)))
    reference = model(input_ids=probe, use_cache=False).logits.double()
    fold_norms(model, roles)
    pca = ResidualPCA()
    LayerPipeline(InMemorySource(model, coupling.layers_path, device), [pca]).run(batches)
    q, values = pca_basis(pca.gram)
    rotate_and_slice(model, roles, q, roles.width)
    rotated = model(input_ids=probe, use_cache=False).logits.double()
    error = float((rotated - reference).abs().max() / reference.abs().max().clamp_min(1e-30))
    if error > INVARIANCE_TOLERANCE:
        raise UserError(f"--hidden-method rotate: rotating the residual stream changed the logits by {error:.2e} "
                        "(relative); this architecture is not rotation-invariant, use --hidden-method select")
    discard_directions(model, roles, keep)
    plan.keep[roles.group] = list(range(keep))
    plan.chosen_by[roles.group] = CHOOSER
    explained = float(values[:keep].clamp_min(0).sum() / values.clamp_min(0).sum().clamp_min(1e-30))
    log.info("rotation: %d of %d directions keep %.4f of the residual stream", keep, roles.width, explained)
    return roles, RotationReport(kept=keep, width=roles.width, explained=explained, invariance_error=error)
