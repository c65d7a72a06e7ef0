"""Gradient scores computed one decoder layer at a time (forward storing each layer's input, backward visiting
the layers in reverse) equal the scores of one backward pass through the whole model."""
import pytest
import torch

from depgraph_llm import build_coupling
from depgraph_llm.importance import get_estimator, score_groups
from depgraph_llm.importance.gradients import layerwise_gradient_scores
from depgraph_llm.layers import InMemorySource
from tests.tiny import tiny_model

BATCHES = [torch.randint(3, 160, (1, 20), generator=torch.Generator().manual_seed(i)) for i in range(3)]


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("estimator", ["taylor", "taylor-vector", "fisher"])
def test_layerwise_gradient_scores_equal_full_backward(estimator, tie):
    model = tiny_model("llama", tie=tie, num_hidden_layers=4)
    coupling = build_coupling(model)
    full = score_groups(model, coupling.groups, get_estimator(estimator), lambda: BATCHES, False)
    layerwise = layerwise_gradient_scores(InMemorySource(model, coupling.layers_path), coupling.groups,
                                          get_estimator(estimator), BATCHES)
    assert sorted(full) == sorted(layerwise)
    for name in full:
        assert torch.allclose(layerwise[name].double(), full[name].double(), rtol=1e-5, atol=1e-6), name
    assert all(p.grad is None for p in model.parameters())
    assert max(float(s.abs().max()) for s in full.values()) > 1e-4  # the scores are not all ~0


def test_layerwise_gradients_on_gpt2():
    """GPT-2: learned positions before the layers, Conv1D weights, layers returning a tuple-free tensor."""
    from tests.test_architectures import tiny_arch

    model = tiny_arch("gpt2")
    coupling = build_coupling(model)
    full = score_groups(model, coupling.groups, get_estimator("taylor"), lambda: BATCHES, False)
    layerwise = layerwise_gradient_scores(InMemorySource(model, coupling.layers_path), coupling.groups,
                                          get_estimator("taylor"), BATCHES)
    for name in full:
        assert torch.allclose(layerwise[name].double(), full[name].double(), rtol=1e-5, atol=1e-6), name
