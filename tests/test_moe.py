"""Mixture-of-experts conformance: tiny random Mixtral, Qwen2-MoE (shared expert) and Qwen3-MoE with odd sizes.

Every kind prunes (routed experts, the experts' shared intermediate width, the shared expert's channels, hidden,
heads, depth). Oracles: the parameter count of a model built independently from the expected stock config, the
masked dense model (expert channels, shared expert, heads), the dense model with a layer skipped (depth), plain
`from_pretrained` in-process and in a fresh process without depgraph-llm, and a dense model whose planted expert
the router never selects (removing it gives the dense logits).
"""
import copy
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from depgraph_llm.errors import UserError
from depgraph_llm.graph.coupling import build_coupling
from depgraph_llm.graph.groups import GroupKind
from depgraph_llm.models import spec_for
from depgraph_llm.job.output import save_checkpoint
from depgraph_llm.planning.budget import ParamCounter
from depgraph_llm.planning.plan import PrunePlan
from depgraph_llm.removal.apply import apply_plan, mask_model
from tests.test_architectures import greedy, logits, skip_layer_logits
from tests.test_slim_checkpoints import FRESH_PROCESS
from tests.tiny import tiny_tokenizer

COMMON = dict(vocab_size=160, hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
              num_hidden_layers=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
# name: (model_type, fields, experts field, expert width field, shared-expert width field or None)
MOE_ARCHS = {
    "mixtral": ("mixtral", dict(intermediate_size=37, num_local_experts=5, num_experts_per_tok=2),
                "num_local_experts", "intermediate_size", None),
    "qwen2-moe": ("qwen2_moe", dict(moe_intermediate_size=37, shared_expert_intermediate_size=29,
                                    intermediate_size=41, num_experts=5, num_experts_per_tok=2),
                  "num_experts", "moe_intermediate_size", "shared_expert_intermediate_size"),
    "qwen3-moe": ("qwen3_moe", dict(moe_intermediate_size=37, intermediate_size=41, num_experts=5,
                                    num_experts_per_tok=2),
                  "num_experts", "moe_intermediate_size", None),
}
KEPT_EXPERTS = [0, 2, 3]
# the reference experts loop: it runs any width (CPU grouped_mm needs rows of a multiple of 16 bytes)
IMPLEMENTATION = "eager"


def tiny_moe(arch: str, seed: int = 0, implementation: str = IMPLEMENTATION, **overrides):
    model_type, fields, *_ = MOE_ARCHS[arch]
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**COMMON, **fields, **overrides})
    config._experts_implementation = implementation
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # perturb norms (HF sets them to 1) so a wrong axis shows up in the logits
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def kinds_of(arch: str) -> list[str]:
    return ["experts", "expert_channels", "hidden", "heads", "depth"] + (["shared"] if MOE_ARCHS[arch][4] else [])


def moe_plan(model, coupling, kind: str) -> PrunePlan:
    """Drop units of `kind` in an irregular pattern (experts 1 and 4; every third channel)."""
    keep, keep_nested, removed = {}, {}, []
    for group in coupling.groups:
        if kind == "experts" and group.kind == GroupKind.EXPERTS:
            keep[group.name] = list(KEPT_EXPERTS)
        if kind == "expert_channels" and group.kind == GroupKind.EXPERT_CHANNELS:
            keep[group.name] = [i for i in range(group.size) if i % 3 != 1]
        if kind == "shared" and group.kind == GroupKind.CHANNELS:
            keep[group.name] = [i for i in range(group.size) if i % 3 != 1]
        if kind == "heads" and group.kind == GroupKind.HEADS:
            keep_nested[group.nested.name] = [[1]] * group.size
        if kind == "hidden" and group.kind == GroupKind.HIDDEN:
            keep[group.name] = [i for i in range(group.size) if i % 4 != 2]
    if kind == "depth":
        removed = [1]
    params = sum(p.numel() for p in model.parameters())
    return PrunePlan("", model.config.model_type, "test", kind, 0, 0.1, 1, params, 0, keep=keep,
                     keep_nested=keep_nested, removed_layers=removed)


def expected_fields(arch: str, kind: str) -> dict:
    """The stock config fields the pruned model must have (computed by hand from the plan)."""
    _, fields, experts_field, width_field, shared_field = MOE_ARCHS[arch]
    return {"experts": {experts_field: len(KEPT_EXPERTS)},
            "expert_channels": {width_field: 37 - len(range(1, 37, 3))},
            "shared": {shared_field: 29 - len(range(1, 29, 3))} if shared_field else {},
            "hidden": {"hidden_size": 48 - 12},
            "heads": {"num_attention_heads": 2},
            "depth": {"num_hidden_layers": 1}}[kind]


def independent_count(arch: str, fields: dict) -> int:
    """Parameters of a model the stock class builds (on meta) from the expected config."""
    model_type, base, *_ = MOE_ARCHS[arch]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**COMMON, **base, **fields}))
    return sum(p.numel() for p in model.parameters())


def load(folder, implementation: str = IMPLEMENTATION):
    return AutoModelForCausalLM.from_pretrained(folder, experts_implementation=implementation).eval()


def fresh_outputs(folders, work_dir) -> dict:
    """Plain from_pretrained in a fresh process where depgraph-llm is not importable."""
    script = FRESH_PROCESS.replace("trust_remote_code=True)", f"experts_implementation={IMPLEMENTATION!r})")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script, os.pathsep.join(str(f) for f in folders),
                             str(work_dir / "fresh.pt"), root, "6"], capture_output=True, text=True, cwd=work_dir,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(work_dir / "fresh.pt", weights_only=True)


def test_routed_experts_are_coupled_from_the_trace():
    """Router row e, gate_up_proj[e] and down_proj[e] are one expert; the experts' intermediate channels run over
    gate and up rows (two segments) and down columns of every expert; hidden runs through router and experts;
    the shared expert is an ordinary MLP group; no op is frozen."""
    coupling = build_coupling(tiny_moe("qwen2-moe"))
    groups = coupling.by_name()
    assert not coupling.frozen_ops
    experts = groups["layers.1.mlp.experts"]
    assert experts.kind == GroupKind.EXPERTS and experts.size == 5
    assert {(s.param, s.axis) for s in experts.slices} == {
        ("model.layers.1.mlp.gate.weight", 0), ("model.layers.1.mlp.experts.gate_up_proj", 0),
        ("model.layers.1.mlp.experts.down_proj", 0)}
    channels = groups["layers.1.mlp.experts.channels"]
    assert channels.kind == GroupKind.EXPERT_CHANNELS and channels.size == 37
    assert sorted((s.param.rsplit(".", 1)[1], s.axis, s.offset) for s in channels.slices) == [
        ("down_proj", 2, 0), ("gate_up_proj", 1, 0), ("gate_up_proj", 1, 37)]
    shared = groups["layers.1.mlp.shared_expert.channels"]
    assert shared.kind == GroupKind.CHANNELS and shared.size == 29
    hidden = {(s.param, s.axis) for s in groups["hidden"].slices}
    assert {("model.layers.1.mlp.gate.weight", 1), ("model.layers.1.mlp.experts.gate_up_proj", 2),
            ("model.layers.1.mlp.experts.down_proj", 1), ("model.layers.1.mlp.shared_expert_gate.weight", 1)} <= hidden


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_every_experts_implementation_traces_alike(implementation):
    """The default grouped_mm dispatch (sort, histc, cumsum offsets, grouped_mm) and batched_mm (gather each token's
    expert weights) give the same groups."""
    reference = build_coupling(tiny_moe("mixtral"))
    other = build_coupling(tiny_moe("mixtral", implementation=implementation))
    assert not other.frozen_ops
    assert [(g.name, g.kind, g.size, g.slices) for g in other.groups] == [
        (g.name, g.kind, g.size, g.slices) for g in reference.groups]


def check_kind(arch: str, kind: str, out) -> tuple:
    """Prune one kind on a fresh tiny model and check it against the oracles; (folder, logits, greedy tokens)."""
    model_type = MOE_ARCHS[arch][0]
    model = tiny_moe(arch)
    coupling = build_coupling(model)
    plan = moe_plan(model, coupling, kind)
    assert plan.keep or plan.keep_nested or plan.removed_layers, (arch, kind, "no prunable groups")
    reference = None
    if kind == "depth":
        reference = skip_layer_logits(model, 1)
    elif kind in ("expert_channels", "shared", "heads"):
        masked = copy.deepcopy(model)
        mask_model(masked, coupling, plan)
        reference = logits(masked)
    counter = ParamCounter({n: tuple(p.shape) for n, p in model.named_parameters()}, coupling)
    kept = {name: len(units) for name, units in plan.keep.items()}
    kept.update({name: len(rows[0]) for name, rows in plan.keep_nested.items()})
    counted = counter.count(kept, removed_layers=frozenset(plan.removed_layers))
    apply_plan(model, coupling, plan, spec_for(model_type))
    plan.params_after = sum(p.numel() for p in model.parameters())
    fields = expected_fields(arch, kind)
    assert plan.params_after == counted == independent_count(arch, fields), (arch, kind)
    assert {f: getattr(model.config, f) for f in fields} == fields, (arch, kind)
    pruned_logits = logits(model)
    if reference is not None:
        assert torch.allclose(pruned_logits, reference, atol=1e-5), (arch, kind)
    save_checkpoint(model, tiny_tokenizer(), out, plan, {}, overwrite=False)
    reloaded = load(out)
    assert type(reloaded).__name__ == type(model).__name__  # a stock class: no remote code
    assert torch.equal(logits(reloaded), pruned_logits), (arch, kind)
    tokens = greedy(model)
    assert torch.equal(greedy(reloaded), tokens), (arch, kind)
    return out, pruned_logits, tokens


@pytest.mark.parametrize("kind", ["experts", "expert_channels"])
def test_experts_and_expert_channels_prune_on_qwen2_moe(kind, tmp_path):
    """The default run's share of the matrix below: the two expert kinds on Qwen2-MoE, reloaded in-process."""
    check_kind("qwen2-moe", kind, tmp_path / kind)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(MOE_ARCHS))
def test_moe_conformance(arch, tmp_path):
    """Every kind in turn (about a minute per architecture), then a fresh process reloads every checkpoint."""
    saved = {kind: check_kind(arch, kind, tmp_path / kind) for kind in kinds_of(arch)}
    fresh = fresh_outputs([out for out, _, _ in saved.values()], tmp_path / "fresh")
    for kind, (out, expected_logits, expected_tokens) in saved.items():
        assert torch.equal(fresh[str(out)]["logits"], expected_logits), (arch, kind)
        assert torch.equal(fresh[str(out)]["generated"], expected_tokens), (arch, kind)


def plant_unused_expert(model, expert: int, channel: int = 5) -> None:
    """Make `expert` of every layer unselectable: hidden `channel` is a positive constant in every token's residual
    stream (the embedding writes 0.05 there, no layer writes to it), so after any norm with positive weights it is
    positive; only the expert's router row reads it, with weight -1e4 (the others' routing is left to the rest)."""
    with torch.no_grad():
        model.get_input_embeddings().weight[:, channel] = 0.05
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "shared_expert.down_proj.weight")):
                param[channel] = 0.0
            elif name.endswith("experts.down_proj"):
                param[:, channel] = 0.0
        for layer in model.model.layers:
            assert bool((layer.post_attention_layernorm.weight[channel] > 0).all())
            layer.mlp.gate.weight[:, channel] = 0.0
            layer.mlp.gate.weight[expert] = 0.0
            layer.mlp.gate.weight[expert, channel] = -1e4


@pytest.mark.parametrize("arch", sorted(MOE_ARCHS))
def test_removing_an_expert_the_router_never_selects_changes_nothing(arch):
    """Removing a planted expert (never among the top-k, softmax weight exactly zero) gives the dense logits and
    generations exactly."""
    model = tiny_moe(arch)
    plant_unused_expert(model, expert=3)
    selected = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda module, args, output: selected.append(output[2]))
             for layer in model.model.layers]
    dense_logits, dense_tokens = logits(model), greedy(model)
    for hook in hooks:
        hook.remove()
    assert selected and not any(bool((ids == 3).any()) for ids in selected)  # the plant worked
    coupling = build_coupling(model)
    keep = {g.name: [0, 1, 2, 4] for g in coupling.of_kind(GroupKind.EXPERTS)}
    plan = PrunePlan("", model.config.model_type, "test", "experts", 0, 0.1, 1, 1, 1, keep=keep)
    apply_plan(model, coupling, plan, spec_for(MOE_ARCHS[arch][0]))
    assert model.model.layers[0].mlp.gate.weight.shape[0] == 4
    # equal up to float reduction order: the router's softmax / top-k over 4 instead of 5 experts can take another
    # SIMD path on some CPUs (seen: 4.5e-8 on an AMD EPYC), so bit equality would test the CPU, not the removal
    assert torch.allclose(logits(model), dense_logits, rtol=0, atol=1e-6) and torch.equal(greedy(model), dense_tokens)


def test_top_k_is_clipped_to_the_experts_left(tmp_path):
    """Keeping one expert of five leaves top-1 routing, in the config and on the router."""
    model = tiny_moe("mixtral")
    coupling = build_coupling(model)
    keep = {g.name: [2] for g in coupling.of_kind(GroupKind.EXPERTS)}
    params = sum(p.numel() for p in model.parameters())
    plan = PrunePlan("", "mixtral", "test", "experts", 0, 0.1, 1, params, 0, keep=keep)
    apply_plan(model, coupling, plan, spec_for("mixtral"))
    assert model.config.num_local_experts == 1 and model.config.num_experts_per_tok == 1
    assert model.model.layers[0].mlp.gate.top_k == 1
    plan.params_after = sum(p.numel() for p in model.parameters())
    assert plan.params_after == independent_count("mixtral", dict(num_local_experts=1, num_experts_per_tok=1))
    save_checkpoint(model, tiny_tokenizer(), tmp_path / "out", plan, {}, overwrite=False)
    assert torch.equal(logits(load(tmp_path / "out")), logits(model))


def test_default_grouped_mm_runs_the_pruned_model(tmp_path):
    """With transformers' default experts dispatch (grouped_mm, which on CPU needs widths of a multiple of 4
    floats), a pruned model with aligned widths computes what the reference loop computes, and reloads alike."""
    model = tiny_moe("qwen3-moe", implementation="grouped_mm", moe_intermediate_size=40)
    coupling = build_coupling(model)
    keep = {g.name: list(range(0, 40, 5)) + list(range(1, 40, 5)) + list(range(2, 40, 5)) + list(range(3, 40, 5))
            for g in coupling.of_kind(GroupKind.EXPERT_CHANNELS)}
    keep = {name: sorted(units) for name, units in keep.items()}
    keep.update({g.name: [0, 1, 3, 4] for g in coupling.of_kind(GroupKind.EXPERTS)})
    params = sum(p.numel() for p in model.parameters())
    plan = PrunePlan("", "qwen3_moe", "test", "experts", 0, 0.1, 1, params, 0, keep=keep)
    apply_plan(model, coupling, plan, spec_for("qwen3_moe"))
    plan.params_after = sum(p.numel() for p in model.parameters())
    assert model.config.moe_intermediate_size == 32 and model.config.num_experts == 4
    save_checkpoint(model, tiny_tokenizer(), tmp_path / "out", plan, {}, overwrite=False)
    default = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert default.config._experts_implementation == "grouped_mm"
    assert torch.allclose(logits(default), logits(load(tmp_path / "out")), atol=1e-5)
    assert torch.equal(logits(default), logits(model))


def test_active_parameters_count_only_the_top_k_experts():
    """Hand count on the tiny Mixtral (5 experts of 3 x 37 x 48 weights, top-2, 2 layers): a token skips 3 experts
    per layer before, and 1 after keeping experts [0, 2, 3]; the router runs for every token."""
    from depgraph_llm.planning.experts import active_parameters

    model = tiny_moe("mixtral")
    coupling = build_coupling(model)
    total = sum(p.numel() for p in model.parameters())
    per_expert = 3 * 37 * 48
    assert active_parameters(coupling) == (total, total - 2 * 3 * per_expert)
    plan = moe_plan(model, coupling, "experts")
    after = total - 2 * 2 * (per_expert + 48)  # 2 layers x 2 experts, each with its router row
    assert active_parameters(coupling, plan) == (after, after - 2 * 1 * per_expert)
    assert active_parameters(build_coupling(tiny_moe("qwen2-moe"))) is not None


@pytest.mark.slow
def test_prune_cli_end_to_end_on_tiny_mixtral(tmp_path):
    """prune.py with the default recipe (taylor, uniform, OBS reconstruction, which leaves the routed experts as
    they are) on a saved tiny Mixtral reaches --ratio 0.3, reports the active-parameter ratio, and saves a stock
    checkpoint; `depgraph-llm graph` lists the expert groups."""
    import json

    from tests.cli_helpers import run_cli, run_prune

    model = tiny_moe("mixtral", implementation="grouped_mm", intermediate_size=384, num_local_experts=4,
                     num_hidden_layers=2)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(tmp_path / "src")
    tiny_tokenizer().save_pretrained(tmp_path / "src")
    graph = run_cli("graph", "--model", str(tmp_path / "src"))
    assert graph.returncode == 0, graph.stderr[-2000:]
    assert "layers.0.mlp.experts " in graph.stdout and "expert_channels" in graph.stdout
    assert "ops frozen" not in graph.stdout
    result = run_prune("--model", str(tmp_path / "src"), "--ratio", "0.3", "--experts-keep", "3", "--out",
                       str(tmp_path / "out"), "--seq-len", "32", "--calibration-samples", "2", "--eval-tokens", "128")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert abs(report["ratio_achieved"] - 0.3) <= 0.01
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    config = reloaded.config
    assert config.num_local_experts == 3 and config.model_type == "mixtral"
    assert sum(p.numel() for p in reloaded.parameters()) == report["params_after"]
    per_expert = 3 * config.intermediate_size * config.hidden_size
    assert report["active_params_after"] == report["params_after"] - 2 * (3 - 2) * per_expert


@pytest.mark.slow
def test_per_layer_expert_counts_and_widths_reload(tmp_path):
    """Layer 0 keeps 3 experts of 32 channels, layer 1 keeps 4 of 28 (widths the default grouped_mm dispatch runs on
    CPU, which the reloaded model uses): a per_layer_config checkpoint that loads with load_pruned and, in a fresh
    process without depgraph-llm, with its own remote code; identical outputs."""
    from depgraph_llm import load_pruned
    from tests.test_slim_checkpoints import fresh_process_outputs

    model = tiny_moe("qwen2-moe")
    coupling = build_coupling(model)
    keep = {}
    for group in coupling.groups:
        if group.kind == GroupKind.EXPERTS:
            keep[group.name] = [0, 2, 3] if group.layer == 0 else [0, 1, 2, 4]
        if group.kind == GroupKind.EXPERT_CHANNELS:
            keep[group.name] = list(range(32 - 4 * group.layer))
    params = sum(p.numel() for p in model.parameters())
    plan = PrunePlan("", "qwen2_moe", "test", "experts", 0, 0.1, 1, params, 0, keep=keep)
    apply_plan(model, coupling, plan, spec_for("qwen2_moe"))
    plan.params_after = sum(p.numel() for p in model.parameters())
    per_expert = 3 * 48  # one channel of one expert: a gate row, an up row, a down column
    router_row = 48
    assert params - plan.params_after == 2 * (37 * per_expert + router_row) + 1 * (37 * per_expert + router_row) + (
        3 * 5 * per_expert + 4 * 9 * per_expert)  # layer 0: 2 experts, layer 1: 1 expert; then the channels
    assert model.config.model_type == "qwen2_moe" and model.config.architectures == ["DepgraphForCausalLM"]
    save_checkpoint(model, tiny_tokenizer(), tmp_path / "out", plan, {}, overwrite=False)
    reloaded = load_pruned(tmp_path / "out").eval()
    assert torch.equal(logits(reloaded), logits(model)) and torch.equal(greedy(reloaded), greedy(model))
    fresh = fresh_process_outputs([tmp_path / "out"], tmp_path / "fresh", new_tokens=6)[str(tmp_path / "out")]
    assert torch.equal(fresh["logits"], logits(model)) and torch.equal(fresh["generated"], greedy(model))
