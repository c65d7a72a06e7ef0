"""Expert importance: the pure functions on hand-made cases, and each estimator on a planted tiny MoE."""
import pytest
import torch

from depgraph_llm.graph.coupling import build_coupling
from depgraph_llm.graph.groups import GroupKind
from depgraph_llm.importance import get_estimator, score_groups
from depgraph_llm.importance.experts import (best_removal, greedy_removal_order, order_scores, reap_scores, route,
                                             routing_frequency)
from tests.test_moe import plant_unused_expert, tiny_moe


def test_routing_frequency_counts_top_k_picks():
    index = torch.tensor([[0, 1], [0, 2], [0, 1]])
    assert torch.allclose(routing_frequency(index, 4), torch.tensor([1, 2 / 3, 1 / 3, 0], dtype=torch.float64))


def test_reap_is_the_mean_gate_times_output_norm_over_routed_tokens():
    index = torch.tensor([[0, 1], [1, 0], [2, 1]])
    weights = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.9, 0.1]])
    norms = torch.tensor([[2.0, 4.0], [6.0, 1.0], [10.0, 3.0]])
    # expert 0: 0.75*2, 0.5*1 -> 1.0; expert 1: 0.25*4, 0.5*6, 0.1*3 -> 4.3/3; expert 2: 0.9*10; expert 3: nobody
    expected = torch.tensor([1.0, 4.3 / 3, 9.0, 0.0], dtype=torch.float64)
    assert torch.allclose(reap_scores(index, weights, norms, 4), expected)


ERRORS = {frozenset(): 0.0, frozenset({0}): 1.0, frozenset({1}): 2.0, frozenset({2}): 2.0,
          frozenset({0, 1}): 10.0, frozenset({0, 2}): 10.0, frozenset({1, 2}): 3.0}


def test_enumeration_finds_the_subset_greedy_misses():
    """Dropping expert 0 alone costs least, but the best pair is {1, 2}: enumeration finds it, greedy cannot."""
    assert best_removal(ERRORS.__getitem__, 3, 2) == frozenset({1, 2})
    assert best_removal(ERRORS.__getitem__, 3, 2, max_subsets=0) == frozenset({0, 1})  # greedy, ties to the lower
    assert greedy_removal_order(ERRORS.__getitem__, 3) == [0, 1]
    assert order_scores([0, 1], 3).tolist() == [0.0, 1.0, 3.0]


def test_route_masks_removed_experts_and_renormalises():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    weights, index = route(logits, 2, True, frozenset({0}))
    assert index.tolist() == [[1, 2]] and torch.allclose(weights.sum(-1), torch.ones(1))
    weights, _ = route(logits, 2, False)
    assert torch.allclose(weights, torch.softmax(logits, -1)[:, :2])


@pytest.mark.parametrize("estimator", ["expert-frequency", "reap", "expert-reconstruction"])
def test_estimators_rank_the_planted_unused_expert_last(estimator):
    """Expert 3 of every layer is never routed to: frequency and REAP give it 0, and removing it changes no output,
    so greedy elimination removes it first. Every other group still gets scores (taylor)."""
    torch.manual_seed(0)
    model = tiny_moe("mixtral")
    plant_unused_expert(model, expert=3)
    coupling = build_coupling(model)
    batches = [torch.randint(3, 160, (2, 24)) for _ in range(2)]
    scores = score_groups(model, coupling.groups, get_estimator(estimator), lambda: batches, show_progress=False)
    assert set(scores) >= {g.name for g in coupling.groups if g.kind != GroupKind.LAYER}
    for group in coupling.of_kind(GroupKind.EXPERTS):
        values = scores[group.name]
        assert int(values.argmin()) == 3 and float(values[3]) == 0.0 and bool((values[[0, 1, 2, 4]] > 0).all())


def test_reap_sees_an_expert_that_is_routed_to_but_outputs_nothing():
    """Expert 1's down projection is zero: the router still picks it (frequency > 0), its REAP score is 0."""
    model = tiny_moe("mixtral")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.down_proj[1] = 0.0
    coupling = build_coupling(model)
    batches = [torch.randint(3, 160, (2, 24))]
    groups = coupling.of_kind(GroupKind.EXPERTS)
    frequency = score_groups(model, groups, get_estimator("expert-frequency"), lambda: batches, False)
    reap = score_groups(model, groups, get_estimator("reap"), lambda: batches, False)
    for group in groups:
        assert float(frequency[group.name][1]) > 0 and float(reap[group.name][1]) == 0.0
        assert bool((reap[group.name][[0, 2, 3, 4]] > 0).all())
