"""Planning on mixtures of experts: Qwen2-MoE's shared expert under the total --ratio, and the non-uniform width
schedules (global, log-increase) and the layer-range / depth schedules on tiny Mixtral, Qwen2-MoE and Qwen3-MoE.

Oracles: the parameter count of a model the stock class builds from a config written by hand from the plan's kept
counts, the dense model's masked forward (same kept units), and a per_layer_config checkpoint reloaded with
load_pruned (identical logits and greedy generations).
"""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from depgraph_llm.checkpoint.loading import load_pruned
from depgraph_llm.graph.groups import GroupKind
from depgraph_llm.job.options import PruneOptions
from depgraph_llm.job.in_memory import plan_in_memory, prune_in_memory
from depgraph_llm.job.output import save_checkpoint
from depgraph_llm.job.timing import StageTimer
from depgraph_llm.removal.apply import mask_model
from depgraph_llm.removal.slim_config import saved_per_layer_widths
from tests.test_architectures import greedy, logits
from tests.test_moe import independent_count, tiny_moe
from tests.tiny import tiny_tokenizer


def batches():
    torch.manual_seed(0)
    return [torch.randint(3, 160, (1, 32)) for _ in range(2)]


def kept_len(plan, group, default: int) -> int:
    return len(plan.keep[group]) if group in plan.keep else default


def test_qwen2_moe_shared_expert_prunes_under_the_total_ratio(tmp_path):
    """--ratio 0.3 with no other option: the routed experts' width and the shared expert's width lose the same
    fraction (29 * w / 37, rounded); the count equals a stock Qwen2-MoE built from the hand-written config; masked
    dense == pruned; a plain from_pretrained reload gives the same logits."""
    model = tiny_moe("qwen2-moe")
    masked = copy.deepcopy(model)
    options = PruneOptions(ratio=0.3, importance="l2", reconstruct="none", round_to=1, show_progress=False)
    plan, coupling = prune_in_memory(model, batches(), options)
    width = kept_len(plan, "layers.0.mlp.experts.channels", 37)
    shared = kept_len(plan, "layers.0.mlp.shared_expert.channels", 29)
    assert width < 37 and shared == round(29 * width / 37) < 29
    assert kept_len(plan, "layers.1.mlp.shared_expert.channels", 29) == shared
    q_per_kv = len(plan.keep_nested["layers.0.self_attn.heads.query_per_kv"][0]) if plan.keep_nested else 2
    kv = kept_len(plan, "layers.0.self_attn.heads", 2)
    fields = dict(moe_intermediate_size=width, shared_expert_intermediate_size=shared,
                  num_attention_heads=kv * q_per_kv, num_key_value_heads=kv)
    assert plan.params_after == sum(p.numel() for p in model.parameters()) == independent_count("qwen2-moe", fields)
    assert abs(plan.ratio_achieved - 0.3) <= 0.01
    mask_model(masked, coupling, plan)
    assert torch.allclose(logits(model), logits(masked), atol=1e-5)
    save_checkpoint(model, tiny_tokenizer(), tmp_path / "out", plan, {}, overwrite=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", experts_implementation="eager").eval()
    assert {f: getattr(reloaded.config, f) for f in fields} == fields
    assert torch.equal(logits(reloaded), logits(model))


WIDTH_FIELDS = {"mixtral": dict(intermediate_size=40), "qwen3-moe": dict(moe_intermediate_size=40),
                "qwen2-moe": dict(moe_intermediate_size=40, shared_expert_intermediate_size=32)}


@pytest.mark.parametrize("schedule", ["global", "log-increase"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3-moe", "qwen2-moe"])
def test_nonuniform_schedules_on_moe_save_per_layer_widths_and_reload(arch, schedule, tmp_path):
    """3 layers, 4 of 5 experts kept everywhere (--experts-keep survives the schedule), the experts' width (and the
    shared expert's) varies by layer; the ratio holds; per_layer_config records each layer's widths and expert
    count; load_pruned gives the same logits and generations."""
    model = tiny_moe(arch, num_hidden_layers=3, **WIDTH_FIELDS[arch])
    with torch.no_grad():  # layer 2: half its expert channels nearly zero, so a global ranking cuts it deeper
        experts = model.model.layers[2].mlp.experts
        experts.gate_up_proj[:, :20] *= 0.01
        experts.gate_up_proj[:, 40:60] *= 0.01
        experts.down_proj[:, :, :20] *= 0.01
    options = PruneOptions(ratio=0.3, importance="l2", reconstruct="none", round_to=4, schedule=schedule,
                           experts_keep=4, show_progress=False)
    plan, coupling = prune_in_memory(model, batches(), options)
    assert abs(plan.ratio_achieved - 0.3) <= 0.01
    experts = {g.layer: len(plan.keep[g.name]) for g in coupling.of_kind(GroupKind.EXPERTS)}
    assert experts == {0: 4, 1: 4, 2: 4}
    widths = {g.layer: kept_len(plan, g.name, g.size) for g in coupling.of_kind(GroupKind.EXPERT_CHANNELS)}
    assert len(set(widths.values())) > 1 and all(w % 4 == 0 for w in widths.values()), widths
    if schedule == "log-increase":
        assert widths[0] >= widths[1] >= widths[2]
    save_checkpoint(model, tiny_tokenizer(), tmp_path / "out", plan, {}, overwrite=False)
    assert saved_per_layer_widths(json.loads((tmp_path / "out" / "config.json").read_text()))
    reloaded = load_pruned(tmp_path / "out", experts_implementation="eager").eval()
    for index, layer in enumerate(reloaded.model.layers):
        assert tuple(layer.mlp.experts.gate_up_proj.shape) == (4, 2 * widths[index], 48)
    assert sum(p.numel() for p in reloaded.parameters()) == plan.params_after
    assert torch.equal(logits(reloaded), logits(model)) and torch.equal(greedy(reloaded), greedy(model))


@pytest.mark.parametrize("schedule,ratio", [("layers:1:3", 0.15), ("depth", 0.4)])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3-moe"])
def test_layer_range_and_depth_schedules_plan_on_moe(arch, schedule, ratio):
    """The other schedules plan on MoE too: a layer range prunes only its layers' experts and widths, depth removes
    a whole MoE layer (its expert groups go with it) and trims the rest to the ratio."""
    model = tiny_moe(arch, num_hidden_layers=4, **WIDTH_FIELDS[arch])
    options = PruneOptions(ratio=ratio, importance="l2", reconstruct="none", round_to=4, schedule=schedule,
                           show_progress=False)
    plan, coupling = plan_in_memory(model, batches(), options, "", StageTimer())
    assert abs(plan.ratio_achieved - ratio) <= 0.01
    layers = {g.layer for g in coupling.groups if g.name in plan.keep and g.layer is not None}
    if schedule == "depth":
        assert plan.removed_layers and not layers & set(plan.removed_layers)
    else:
        assert layers == {1, 2}
