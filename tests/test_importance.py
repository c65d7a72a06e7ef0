"""Estimators on cases where the right answer is known by hand."""
import torch

from depgraph_llm import build_coupling
from depgraph_llm.groups import Slice
from depgraph_llm.importance import ESTIMATORS, get_estimator, score_groups
from tests.tiny import tiny_model


def test_registry_has_foundation_estimators():
    assert {"l1", "l2", "random", "taylor", "taylor-vector"} <= set(ESTIMATORS)


def test_slice_unit_scores_on_small_matrix():
    weight = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    rows = Slice("w", 0, (4,), 0).unit_scores(weight.pow(2))
    assert torch.equal(rows, weight.pow(2).sum(1))
    cols_as_heads = Slice("w", 1, (3, 2), 0).unit_scores(weight)  # 3 heads of width 2 along the columns
    assert torch.equal(cols_as_heads, torch.stack([weight[:, 0:2].sum(), weight[:, 2:4].sum(), weight[:, 4:6].sum()]))
    nested = Slice("w", 1, (3, 2), 1, outer=0).unit_scores(weight)
    assert torch.equal(nested, weight.sum(0).reshape(3, 2))


def test_l2_sums_every_coupled_slice():
    model = tiny_model("llama")
    coupling = build_coupling(model)
    scores = score_groups(model, coupling.groups, get_estimator("l2"))
    mlp = model.model.layers[1].mlp
    expected = mlp.gate_proj.weight.pow(2).sum(1) + mlp.up_proj.weight.pow(2).sum(1) + mlp.down_proj.weight.pow(2).sum(0)
    assert torch.allclose(scores["layers.1.mlp.channels"].float(), expected.detach(), rtol=1e-5)


def test_taylor_equals_weight_times_gradient():
    model = tiny_model("llama")
    coupling = build_coupling(model)
    batch = [torch.randint(0, 160, (1, 16), generator=torch.Generator().manual_seed(3))]
    scores = score_groups(model, coupling.groups, get_estimator("taylor"), lambda: batch, show_progress=False)
    vector = score_groups(model, coupling.groups, get_estimator("taylor-vector"), lambda: batch, show_progress=False)
    assert all(p.grad is None for p in model.parameters())  # gradients are freed after scoring
    model(input_ids=batch[0], labels=batch[0]).loss.backward()
    mlp = model.model.layers[2].mlp
    wg = [(m.weight * m.weight.grad).detach() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    element = wg[0].abs().sum(1) + wg[1].abs().sum(1) + wg[2].abs().sum(0)
    signed = (wg[0].sum(1) + wg[1].sum(1) + wg[2].sum(0)).abs()
    assert torch.allclose(scores["layers.2.mlp.channels"].float(), element, rtol=1e-4)
    assert torch.allclose(vector["layers.2.mlp.channels"].float(), signed, rtol=1e-4, atol=1e-9)
