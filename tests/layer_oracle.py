"""Fingerprints of tiny prunes (plan + weights + config) for every estimator family, schedule and reconstruction
mode: the oracle that keeps the layer pipeline's port byte-identical to the hand-written passes it replaced.

The JSON was written by `python -m tests.layer_oracle` at commit 9b9c579, before the port (the hand-written
passes and the old `prune_in_memory` signature); never regenerate it to make a failing test pass."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

ORACLE = Path(__file__).parent / "data" / "layer_pipeline_oracle.json"

# name -> (architecture, prune options)
CASES: dict[str, tuple[str, dict]] = {
    "l2": ("llama", dict(importance="l2")),
    "random": ("llama", dict(importance="random")),
    "wanda-sp": ("llama", dict(importance="wanda-sp")),
    "flap": ("llama", dict(importance="flap")),
    "obs": ("llama", dict(importance="obs")),
    "taylor": ("llama", dict(importance="taylor")),
    "taylor-vector": ("llama", dict(importance="taylor-vector")),
    "fisher": ("llama", dict(importance="fisher")),
    "wanda-sp-hidden": ("llama", dict(importance="wanda-sp", hidden_ratio=0.25)),
    "depth-bi": ("llama", dict(importance="l2", schedule="depth")),
    "depth-angular": ("llama", dict(importance="l2", schedule="depth", depth_metric="angular")),
    "log-increase-ls": ("llama", dict(importance="wanda-sp", schedule="log-increase", reconstruct="ls")),
    "ls-local": ("llama", dict(importance="l2", reconstruct="ls", reconstruct_mode="local")),
    "obs-sequential": ("llama", dict(importance="l2", reconstruct="obs")),
    "bias": ("llama", dict(importance="l2", reconstruct="bias")),
    "layer-removed-ls-local": ("llama", dict(importance="l2", layers_removed=1, reconstruct="ls",
                                             reconstruct_mode="local")),
    "layer-removed-obs": ("llama", dict(importance="flap", layers_removed=1, reconstruct="obs")),
    "gpt2-obs-ls": ("gpt2", dict(importance="obs", reconstruct="ls")),
}


def case_model(arch: str):
    """A tiny model with room for every schedule (4 layers, 64 MLP channels)."""
    from tests.tiny import tiny_model

    if arch == "gpt2":
        from tests.test_architectures import tiny_arch

        return tiny_arch("gpt2")
    return tiny_model("llama", tie=True, num_hidden_layers=4, intermediate_size=64)


def case_batches(count: int = 3, length: int = 20) -> list[torch.Tensor]:
    return [torch.randint(3, 160, (1, length), generator=torch.Generator().manual_seed(i)) for i in range(count)]


def fingerprint(model, plan) -> dict[str, str]:
    """sha256 of the plan's decisions, of every tensor (name, dtype, shape, bytes) and of the config."""
    decisions = {"keep": plan.keep, "keep_nested": plan.keep_nested, "removed_layers": plan.removed_layers,
                 "params_after": plan.params_after, "reconstruct_report": plan.reconstruct_report}
    weights = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        weights.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        weights.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    config = _as_serialised_at_the_oracle(model.config.to_dict())
    config.pop("transformers_version", None)
    return {"plan": hashlib.sha256(json.dumps(decisions, sort_keys=True).encode()).hexdigest(),
            "weights": weights.hexdigest(),
            "config": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()}


def _as_serialised_at_the_oracle(config: dict) -> dict:
    """Per-layer configs as they were serialised when the oracle was written (model_type `depgraph_<base>`, the
    map under `per_layer_config`, the global-access opt-in saved); the checkpoint format changed since."""
    if "depgraph_per_layer_config" not in config:
        return config
    config = dict(config)
    config["per_layer_config"] = config.pop("depgraph_per_layer_config")
    config["model_type"] = "depgraph_" + config["model_type"]
    config["allow_global_per_layer_attribute_access"] = True
    return config


def run_case(name: str, prune) -> dict[str, str]:
    """`prune(model, batches, options dict) -> plan` on the case's model; returns its fingerprint."""
    arch, options = CASES[name]
    model = case_model(arch)
    options = {"ratio": 0.3, "round_to": 1, "seed": 0, **options}
    plan = prune(model, case_batches(), options)
    return fingerprint(model, plan)


def prune_case(model, batches, options):
    """The in-memory prune job on one case (the options object of `prune_in_memory`)."""
    from depgraph_llm.job.options import PruneOptions
    from depgraph_llm.job.in_memory import prune_in_memory

    plan, _ = prune_in_memory(model, batches, PruneOptions(show_progress=False, **{"reconstruct": "none", **options}))
    return plan


