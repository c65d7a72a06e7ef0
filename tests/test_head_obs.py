"""OBS for query heads nested in KV groups: a duplicated head is found and folded away exactly, with the same
number of heads removed from every KV group, where the planner's own choice loses information."""
import copy

import torch

from depgraph_llm.graph.coupling import build_coupling
from depgraph_llm.graph.groups import GroupKind
from depgraph_llm.models import spec_for
from depgraph_llm.planning.plan import PrunePlan
from depgraph_llm.recovery.head_obs import obs_select_per_block
from depgraph_llm.recovery.reconstruct import OBS_CHOOSER, reconstruct
from depgraph_llm.removal.apply import apply_plan
from tests.tiny import tiny_model

HEAD_DIM, KV, PER_KV = 12, 2, 3
PROMPTS = [torch.randint(0, 160, (1, 24), generator=torch.Generator().manual_seed(s)) for s in range(6)]


def _duplicated_heads_model():
    """6 query heads in 2 KV groups; in every group, query head 1 is a copy of head 0 (same q_proj rows, so the
    same attention output: their o_proj columns see identical inputs), head 2 is distinct."""
    model = tiny_model(num_attention_heads=KV * PER_KV, num_key_value_heads=KV, num_hidden_layers=2)
    with torch.no_grad():
        for layer in model.model.layers:
            q = layer.self_attn.q_proj.weight
            for g in range(KV):
                first = (g * PER_KV) * HEAD_DIM
                q[first + HEAD_DIM:first + 2 * HEAD_DIM] = q[first:first + HEAD_DIM]
    return model.eval()


def _plan_dropping_the_distinct_head(model, coupling) -> PrunePlan:
    nested = {g.nested.name: g for g in coupling.of_kind(GroupKind.HEADS)}
    params = sum(p.numel() for p in model.parameters())
    per_head = 2 * model.config.hidden_size * HEAD_DIM  # a q_proj row block and an o_proj column block
    return PrunePlan("h", "llama", "l2", "uniform", 0, 0.1, 1, params, params - KV * per_head * len(nested),
                     keep_nested={name: [[0, 1]] * KV for name in nested})


def _logits(model):
    with torch.no_grad():
        return torch.cat([model(p).logits for p in PROMPTS])


def _pruned_error(model, dense, method: str) -> tuple[float, PrunePlan]:
    coupling = build_coupling(model)
    plan = _plan_dropping_the_distinct_head(model, coupling)
    pruned = copy.deepcopy(model)
    reconstruct(pruned, coupling, plan, PROMPTS, method=method, mode="local", damp=1e-6)
    apply_plan(pruned, coupling, plan, spec_for("llama"))
    assert sum(p.numel() for p in pruned.parameters()) == plan.params_after
    return float((_logits(pruned) - dense).abs().max()), plan


def test_head_obs_removes_a_duplicate_in_every_kv_group():
    model = _duplicated_heads_model()
    dense = _logits(model)
    obs_error, plan = _pruned_error(model, dense, "obs")
    ls_error, ls_plan = _pruned_error(model, dense, "ls")  # the planner's choice, the distinct head, refitted
    for name, rows in plan.keep_nested.items():  # one of each duplicate pair went, in every KV group
        assert len(rows) == KV and all(len(row) == 2 and 2 in row for row in rows), rows
        assert plan.chosen_by[name] == OBS_CHOOSER
    assert not ls_plan.chosen_by and obs_error < 1e-4 and ls_error > 100 * obs_error


def test_per_block_quota_is_respected_and_cheapest_units_go_first():
    """Four single-column units in two blocks; columns 0 and 2 duplicate 1 and 3: each block loses its duplicate."""
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[:, 0] = x[:, 1]
    x[:, 2] = x[:, 3]
    weight = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    units = [torch.tensor([i]) for i in range(4)]
    removed = obs_select_per_block(weight, x.T @ x, units, [0, 0, 1, 1], {0: 1, 1: 1}, damp=1e-9)
    assert sorted(removed) in ([0, 2], [0, 3], [1, 2], [1, 3])  # a duplicate from each block
    assert len(obs_select_per_block(weight, x.T @ x, units, [0, 0, 1, 1], {0: 2}, damp=1e-9)) == 2
    assert set(obs_select_per_block(weight, x.T @ x, units, [0, 0, 1, 1], {0: 2}, damp=1e-9)) == {0, 1}
