"""Reconstruction after routed-expert removal (recovery/experts.py): router refit and merging.

Oracles: hand computations on small tensors (cluster logits, frequency-weighted merging, a least-squares fit whose
exact answer is linear in the inputs), the dense MoE layer's own output on a hand-built layer where the removed
expert computes the same function as a kept one (every expert routed, so no top-k truncation: the refit and the
merge reproduce the dense output, drop-only does not), the dense model's logits with a planted never-routed
expert, and a fresh computation of the routed-output error on random layers of the three MoE families.
"""
import copy
import math

import pytest
import torch

from depgraph_llm.errors import UserError
from depgraph_llm.graph.coupling import build_coupling
from depgraph_llm.graph.groups import GroupKind
from depgraph_llm.importance.experts import route
from depgraph_llm.job.options import PruneOptions
from depgraph_llm.job.timing import StageTimer
from depgraph_llm.job.in_memory import apply_in_memory
from depgraph_llm.planning.budget import ParamCounter
from depgraph_llm.planning.plan import PrunePlan
from depgraph_llm.recovery.experts import (EXPERT_METHODS, MoEBlock, assign_clusters, cluster_logits, get_method,
                                           merge_rows, reconstruct_block, refit_rows)
from tests.test_architectures import logits
from tests.test_moe import MOE_ARCHS, plant_unused_expert, tiny_moe

CONSTANT = 5  # the hidden channel that holds a constant in the hand-built inputs


def test_cluster_logits_are_the_log_of_the_members_probability_mass():
    logits_ = torch.tensor([[0.0, math.log(3.0), 1.0], [2.0, 2.0, -1.0]])
    target = cluster_logits(logits_, {0: [0, 1], 2: [2]})
    assert torch.allclose(target, torch.tensor([[math.log(4.0), 1.0], [2.0 + math.log(2.0), -1.0]],
                                               dtype=torch.float64))
    # the partition function is the dense one, so the kept softmax is the dense softmax summed over clusters
    dense = torch.softmax(logits_.double(), -1)
    assert torch.allclose(torch.softmax(target, -1), torch.stack([dense[:, 0] + dense[:, 1], dense[:, 2]], -1))


def test_clusters_join_each_removed_expert_to_its_most_similar_kept_one():
    similarity = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.5, 0.5]])  # removed 1, 3, 4 x kept 0, 2
    assert assign_clusters(similarity, [0, 2], [1, 3, 4]) == {0: [0, 3, 4], 2: [2, 1]}


def test_merge_rows_average_by_routing_frequency():
    rows = torch.tensor([[1.0, 2.0], [5.0, 6.0], [9.0, 9.0]])
    frequency = torch.tensor([0.3, 0.1, 0.0])
    merged = merge_rows(rows, [0, 1, 2], frequency)  # expert 2 is never routed: it adds nothing
    assert torch.allclose(merged, torch.tensor([(0.3 * 1 + 0.1 * 5) / 0.4, (0.3 * 2 + 0.1 * 6) / 0.4],
                                               dtype=torch.float64))
    assert merge_rows(rows, [0, 2], frequency) is None  # only the kept expert is used: leave it as it is
    assert torch.equal(merge_rows(rows, [2, 1], frequency), rows[1].double())  # kept never routed: the other's


def test_refit_rows_recovers_a_linear_target_and_leaves_a_zero_correction_alone():
    torch.manual_seed(0)
    x = torch.randn(200, 6)
    weight, bias = torch.randn(3, 6), torch.randn(3)
    dense = x @ weight.T + bias
    wanted_w, wanted_b = weight + torch.randn(3, 6), bias + torch.tensor([1.0, -2.0, 0.5])
    new_w, new_b = refit_rows(x, dense, x.double() @ wanted_w.double().T + wanted_b.double(), weight, bias, ridge=0)
    assert torch.allclose(new_w, wanted_w.double(), atol=1e-8) and torch.allclose(new_b, wanted_b.double(), atol=1e-8)
    same_w, same_b = refit_rows(x, dense, dense, weight, bias)
    assert torch.equal(same_w.float(), weight) and torch.equal(same_b.float(), bias)


def duplicate_layer(arch: str, shift: float = 1.5, **overrides):
    """A tiny model's layer-0 MoE block with every expert routed (top-k = experts, so no top-k truncation) where
    expert 1 computes exactly expert 0's function and its router row is row 0 plus `shift` on a hidden channel that
    is 1 in every input (z_1 = z_0 + shift); inputs with that constant channel."""
    model = tiny_moe(arch, num_experts_per_tok=5, **overrides)
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            getattr(mlp.experts, name)[1] = getattr(mlp.experts, name)[0]
        mlp.gate.weight[1] = mlp.gate.weight[0]
        mlp.gate.weight[1, CONSTANT] += shift
    torch.manual_seed(1)
    x = torch.randn(300, 48)
    x[:, CONSTANT] = 1.0
    return MoEBlock(mlp.gate, mlp.experts, {"gate_up_proj": 0, "down_proj": 0}), x


def routed(block: MoEBlock, x, removed=frozenset()) -> torch.Tensor:
    return block.routed_output(x, block.logits(x), frozenset(removed))


@pytest.mark.parametrize("method", ["router", "merge"])
@pytest.mark.parametrize("arch,norm", [("mixtral", None), ("qwen2-moe", False), ("qwen3-moe", True)])
def test_removing_a_duplicate_expert_is_undone_exactly(arch, norm, method):
    """The known answer: with z_1 = z_0 + s, the cluster {0, 1} has logit z_0 + log(1 + e^s), linear in the inputs,
    so the refit recovers row 0 + log(1 + e^s) on the constant channel; the kept experts' probabilities are then the
    dense ones summed over clusters, and the layer's output is the dense one, softmax-over-top-k (Mixtral) and
    softmax-then-top-k with or without renormalisation (Qwen) alike. Drop-only does not reproduce it."""
    block, x = duplicate_layer(arch, **({} if norm is None else {"norm_topk_prob": norm}))
    reference = routed(block, x)
    row0 = block.router.weight[0].clone()
    drop = routed(block, x, {1})
    assert float((drop - reference).norm() / reference.norm()) > 0.01
    result = reconstruct_block(block, x, kept=[0, 2, 3, 4], merge=method == "merge", ridge=0.0)
    assert result.joined == 1 and result.error_after < 1e-5 < result.error_drop
    expected_row = row0.clone()
    expected_row[CONSTANT] += math.log1p(math.exp(1.5))
    assert torch.allclose(block.router.weight[0], expected_row, atol=1e-4)
    assert torch.allclose(routed(block, x, {1}), reference, atol=1e-5)


@pytest.mark.parametrize("method", ["router", "merge"])
@pytest.mark.parametrize("arch", sorted(MOE_ARCHS))
def test_reconstruction_never_increases_the_calibration_error(arch, method):
    """Random top-2 layers, two experts removed: the routed-output error on the held-out calibration inputs (the
    last quarter), recomputed here from the block's new weights, is at most drop-only's (the block is left
    drop-only where nothing helps)."""
    model = tiny_moe(arch)
    mlp = model.model.layers[1].mlp
    block = MoEBlock(mlp.gate, mlp.experts, {"gate_up_proj": 0, "down_proj": 0})
    torch.manual_seed(2)
    x = torch.randn(256, 48)
    dense = copy.deepcopy(block)
    result = reconstruct_block(block, x, kept=[0, 2, 3], merge=method == "merge")
    held_out = x[192:]
    reference = routed(dense, held_out)
    drop = float((routed(dense, held_out, {1, 4}) - reference).norm() / reference.norm())
    after = float((routed(block, held_out, {1, 4}) - reference).norm() / reference.norm())
    assert abs(result.error_drop - drop) < 1e-6 and abs(result.error_after - after) < 1e-5
    assert after <= drop + 1e-6


def prune_experts(model, keep: list[int], method: str, batches) -> PrunePlan:
    """Remove experts through the layer pipeline (apply_in_memory) with `method` for the removed ones."""
    coupling = build_coupling(model)
    keeps = {g.name: keep for g in coupling.of_kind(GroupKind.EXPERTS)}
    counter = ParamCounter({n: tuple(p.shape) for n, p in model.named_parameters()}, coupling)
    params = sum(p.numel() for p in model.parameters())
    plan = PrunePlan("", model.config.model_type, "test", "uniform", 0, 0.1, 1, params,
                     counter.count({n: len(k) for n, k in keeps.items()}), keep=keeps)
    options = PruneOptions(reconstruct="none", expert_reconstruct=method, show_progress=False)
    apply_in_memory(model, coupling, plan, batches, options, StageTimer())
    return plan


@pytest.mark.parametrize("method", ["router", "merge"])
@pytest.mark.parametrize("arch", sorted(MOE_ARCHS))
def test_a_planted_never_routed_expert_removed_with_reconstruction_gives_the_dense_logits(arch, method):
    """Its cluster logits are the kept logits (exp(-huge) adds nothing), its routing frequency is 0 (nothing to
    merge): the refit leaves the router as it is and the pruned model's logits are the dense ones exactly."""
    model = tiny_moe(arch)
    plant_unused_expert(model, expert=3)
    dense = logits(model)
    torch.manual_seed(0)
    batches = [torch.randint(3, 160, (1, 40)) for _ in range(3)]
    plan = prune_experts(model, [0, 1, 2, 4], method, batches)
    assert plan.expert_reconstruct == method and plan.expert_reconstruct_report["moe_layers"] == 2
    # equal up to float reduction order: the router's softmax / top-k over 4 instead of 5 experts can take another
    # SIMD path on some CPUs (seen: 4.5e-8 on an AMD EPYC), so bit equality would test the CPU, not the removal
    assert torch.allclose(logits(model), dense, rtol=0, atol=1e-6)


def test_pipeline_records_the_method_and_the_merged_model_runs_stock(tmp_path):
    """prune_plan.json / report carry the method and per-layer errors; `apply` refuses to replay a refit plan."""
    from transformers import AutoModelForCausalLM

    from depgraph_llm.job.replay_plan import run_apply

    from depgraph_llm.job.output import save_checkpoint
    from tests.tiny import tiny_tokenizer

    model = tiny_moe("qwen3-moe")
    torch.manual_seed(0)
    batches = [torch.randint(3, 160, (1, 40)) for _ in range(3)]
    plan = prune_experts(model, [0, 2, 3], "merge", batches)
    report = plan.expert_reconstruct_report
    assert report["method"] == "merge" and len(report["per_layer"]) == 2
    assert report["relative_error_after"] <= report["relative_error_drop"]
    save_checkpoint(model, tiny_tokenizer(), tmp_path / "out", plan, {}, overwrite=False)
    saved = PrunePlan.load(tmp_path / "out" / "prune_plan.json")
    assert saved.expert_reconstruct == "merge" and saved.expert_reconstruct_report == report
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", experts_implementation="eager").eval()
    assert torch.equal(logits(reloaded), logits(model))
    with pytest.raises(UserError, match="expert-reconstruct merge"):
        run_apply(tmp_path / "out" / "prune_plan.json", str(tmp_path / "out"), tmp_path / "again")


def test_methods_are_registered_and_unknown_ones_refused():
    assert list(EXPERT_METHODS) == ["drop", "router", "merge"] and get_method("drop").apply is None
    with pytest.raises(UserError, match="--expert-reconstruct 'average' is not available; choose one of: drop"):
        PruneOptions(expert_reconstruct="average").validate()


def test_hidden_pruning_with_a_router_refit_is_refused_in_one_line():
    """The refit rows would lose input columns after the fit: refused before anything changes."""
    model = tiny_moe("mixtral")
    coupling = build_coupling(model)
    hidden = coupling.of_kind(GroupKind.HIDDEN)[0]
    keep = {g.name: [0, 2, 3] for g in coupling.of_kind(GroupKind.EXPERTS)}
    keep[hidden.name] = list(range(0, hidden.size, 2))
    plan = PrunePlan("", "mixtral", "test", "uniform", 0, 0.1, 1, 1, 1, keep=keep)
    from depgraph_llm.recovery.experts import prepare_expert_reconstruction

    with pytest.raises(UserError, match="cannot follow hidden pruning"):
        prepare_expert_reconstruction(coupling, plan, [torch.zeros(1, 4, dtype=torch.long)], "router")
