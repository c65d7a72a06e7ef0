"""The uniform planner hits the requested ratio, respects rounding and refuses unreachable ratios."""
import pytest
import torch

from depgraph_llm import build_coupling
from depgraph_llm.removal.apply import apply_plan
from depgraph_llm.errors import UserError
from depgraph_llm.importance import get_estimator, score_groups
from depgraph_llm.planning.plan import PrunePlan
from depgraph_llm.planning.budget import ParamCounter, plan_uniform, top_k
from depgraph_llm.models import spec_for
from tests.tiny import tiny_model


def plan_for(model, ratio, round_to=1):
    coupling = build_coupling(model)
    counter = ParamCounter({n: tuple(p.shape) for n, p in model.named_parameters()}, coupling)
    scores = score_groups(model, coupling.groups, get_estimator("l2"))
    keep, nested, after = plan_uniform(coupling, counter, scores, ratio, round_to, lambda w: True)
    return coupling, PrunePlan("h", "llama", "l2", "uniform", 0, ratio, round_to, counter.count({}), after, keep, nested)


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.4])
def test_ratio_within_tolerance_and_exact_after_apply(ratio):
    # a wider tiny model so that small ratios are reachable
    model = tiny_model("llama", intermediate_size=203, num_attention_heads=6, num_key_value_heads=3, tie=True,
                       vocab_size=64)
    coupling, plan = plan_for(model, ratio)
    assert abs(plan.ratio_achieved - ratio) <= 0.01
    apply_plan(model, coupling, plan, spec_for("llama"))
    assert sum(p.numel() for p in model.parameters()) == plan.params_after


def test_round_to_multiple():
    model = tiny_model("llama", intermediate_size=805, vocab_size=64)  # one step of 8 channels ~ 0.9% of params
    coupling, plan = plan_for(model, 0.3, round_to=8)
    widths = {len(v) for k, v in plan.keep.items() if "mlp" in k}
    assert len(widths) == 1 and widths.pop() % 8 == 0


def test_unreachable_ratio_names_nearest():
    model = tiny_model("llama")  # embeddings dominate: 90% cannot be removed from layers alone
    with pytest.raises(UserError, match=r"nearest reachable ratio is 0\.\d+") as error:
        plan_for(model, 0.9)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    in_widths = sum(p.numel() for n, p in model.named_parameters() if any(f".{k}." in n for k in projections))
    share = in_widths / sum(p.numel() for p in model.parameters())
    assert f"widths hold {share:.0%} of the parameters: add --hidden-ratio" in str(error.value)


def test_top_k_is_deterministic_on_ties():
    assert top_k(torch.tensor([1.0, 3.0, 3.0, 2.0]), 2) == [1, 2]
    assert top_k(torch.tensor([5.0, 5.0, 5.0]), 2) == [0, 1]
