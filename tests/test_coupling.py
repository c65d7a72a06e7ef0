"""The coupling graph derived from the trace: groups, GQA nesting, tied weights, cross-checks."""
import re

import pytest
import torch

from depgraph_llm import GroupKind, build_coupling
from tests.tiny import tiny_model


def members(group):
    return {(re.sub(r"^model\.layers\.\d+\.", "", s.param), s.axis) for s in group.slices}


@pytest.mark.parametrize("tie", [False, True])
def test_llama_groups(tie):
    coupling = build_coupling(tiny_model("llama", tie=tie))
    groups = coupling.by_name()
    assert not coupling.frozen_ops
    for layer in range(3):
        mlp = groups[f"layers.{layer}.mlp.channels"]
        assert mlp.kind == GroupKind.CHANNELS and mlp.size == 37
        assert members(mlp) == {("mlp.gate_proj.weight", 0), ("mlp.up_proj.weight", 0), ("mlp.down_proj.weight", 1)}
        heads = groups[f"layers.{layer}.self_attn.heads"]
        assert heads.kind == GroupKind.HEADS and heads.size == 2 and heads.unit_width == 12
        assert members(heads) == {(f"self_attn.{p}_proj.weight", 1 if p == "o" else 0) for p in "qkvo"}
        assert heads.nested is not None and heads.nested.size == 2
        assert members(heads.nested) == {("self_attn.q_proj.weight", 0), ("self_attn.o_proj.weight", 1)}
        q_slice = next(s for s in heads.nested.slices if s.param.endswith("q_proj.weight"))
        assert q_slice.factors == (2, 2, 12) and q_slice.factor == 1 and q_slice.outer == 0
    # head_dim is atomic (rotary halves): no group of size 12
    assert all(g.size != 12 for g in coupling.groups)
    hidden = coupling.of_kind(GroupKind.HIDDEN)
    assert len(hidden) == 1 and hidden[0].size == 48
    hidden_members = {(s.param, s.axis) for s in hidden[0].slices}
    assert ("model.embed_tokens.weight", 1) in hidden_members and ("model.norm.weight", 0) in hidden_members
    assert (("lm_head.weight", 1) in hidden_members) == (not tie)
    assert len(hidden_members) == 1 + 3 * 9 + 1 + (0 if tie else 1)
    assert [g.layer for g in coupling.of_kind(GroupKind.LAYER)] == [0, 1, 2]


def test_mha_heads_without_nesting():
    coupling = build_coupling(tiny_model("llama", num_key_value_heads=4))
    heads = coupling.by_name()["layers.0.self_attn.heads"]
    assert heads.size == 4 and heads.nested is None


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_relatives_share_structure(model_type):
    coupling = build_coupling(tiny_model(model_type))
    groups = coupling.by_name()
    assert groups["layers.1.mlp.channels"].size == 37
    heads = groups["layers.1.self_attn.heads"]
    assert heads.size == 2 and heads.nested.size == 2
    if model_type == "qwen2":  # q/k/v biases ride along with their weights
        assert {("self_attn.q_proj.bias", 0), ("self_attn.k_proj.bias", 0), ("self_attn.v_proj.bias", 0)} <= members(heads)


def test_agrees_with_tensor_parallel_plan():
    """Colwise-sharded outputs and rowwise-sharded inputs of a layer are exactly our per-layer prunable axes."""
    model = tiny_model("llama")
    plan = model.model._tp_plan if getattr(model.model, "_tp_plan", None) else model.config.base_model_tp_plan
    coupling = build_coupling(model)
    for layer in range(3):
        expected = set()
        for pattern, style in plan.items():
            if not pattern.startswith("layers.*.") or style not in ("colwise", "rowwise"):
                continue
            module = pattern.replace("layers.*.", "")
            expected.add((f"{module}.weight", 0 if style == "colwise" else 1))
        assert len(expected) == 7, plan
        ours = set()
        for group in coupling.groups:
            if group.layer == layer and group.kind in (GroupKind.CHANNELS, GroupKind.HEADS):
                ours |= members(group)
        assert ours == expected


def _tp_group(model, target, prune_fn):
    torch_pruning = pytest.importorskip("torch_pruning")
    norms = [m.weight for n, m in model.named_modules() if n.endswith("norm")]
    graph = torch_pruning.DependencyGraph().build_dependency(
        model, example_inputs=torch.randint(0, 100, (1, 8)), forward_fn=lambda m, x: m(x).logits,
        unwrapped_parameters=[(w, 0) for w in norms])
    names = {id(m): n for n, m in model.named_modules()}
    names.update({id(p): n.rsplit(".", 1)[0] for n, p in model.named_parameters()})
    out = set()
    for dep, _ in graph.get_pruning_group(target, prune_fn, idxs=[0]):
        name = names.get(id(dep.target.module))
        if name is None:
            continue  # an op node (elementwise) rather than a layer
        axis = 1 if dep.handler.__name__ == "prune_in_channels" else 0
        out.add((name, axis))
    return out


def test_agrees_with_torch_pruning_mlp_and_hidden():
    """Torch-Pruning's DependencyGraph finds the same MLP and hidden-dimension couplings.

    (Its search for attention groups does not terminate on transformers 5 Llama; the TP-plan test covers heads.)
    """
    import torch_pruning as tp

    model = tiny_model("llama")
    coupling = build_coupling(model)
    mlp_tp = _tp_group(model, model.model.layers[1].mlp.gate_proj, tp.prune_linear_out_channels)
    mlp_ours = {(s.param.rsplit(".", 1)[0], s.axis if s.param.endswith("down_proj.weight") else 0)
                for s in coupling.by_name()["layers.1.mlp.channels"].slices}
    assert mlp_tp == mlp_ours
    hidden_tp = _tp_group(model, model.model.embed_tokens, tp.prune_embedding_out_channels)
    hidden_tp = {(n, 0) for n, _ in hidden_tp}
    hidden_ours = {(s.param.rsplit(".", 1)[0], 0) for s in coupling.of_kind(GroupKind.HIDDEN)[0].slices}
    assert hidden_tp == hidden_ours
