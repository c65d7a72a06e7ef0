"""Estimators on cases where the right answer is known by hand."""
import pytest
import torch

from depgraph_llm import build_coupling
from depgraph_llm.graph.groups import Slice
from depgraph_llm.importance import ESTIMATORS, get_estimator, score_groups
from tests.tiny import tiny_model


def test_registry_has_foundation_estimators():
    assert {"l1", "l2", "random", "taylor", "taylor-vector", "fisher", "wanda-sp", "flap", "obs"} <= set(ESTIMATORS)


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


def _down_proj_inputs(model, layer: int, batches) -> torch.Tensor:
    captured = []
    hook = model.model.layers[layer].mlp.down_proj.register_forward_hook(
        lambda m, args, out: captured.append(args[0].reshape(-1, args[0].shape[-1]).double()))
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
    hook.remove()
    return torch.cat(captured)


BATCHES = [torch.randint(0, 160, (1, 20), generator=torch.Generator().manual_seed(i)) for i in range(3)]


def test_activation_estimators_match_their_formulas():
    model = tiny_model("llama")
    coupling = build_coupling(model)
    x = _down_proj_inputs(model, 1, BATCHES)
    w = model.model.layers[1].mlp.down_proj.weight.detach().double()
    wanda = score_groups(model, coupling.groups, get_estimator("wanda-sp"), lambda: BATCHES, False)
    flap = score_groups(model, coupling.groups, get_estimator("flap"), lambda: BATCHES, False)
    expected_wanda = (w.abs() * x.norm(dim=0)[None, :]).sum(0)
    expected_flap = x.var(dim=0, unbiased=False) * w.pow(2).sum(0)
    assert torch.allclose(wanda["layers.1.mlp.channels"], expected_wanda, rtol=1e-4)
    assert torch.allclose(flap["layers.1.mlp.channels"], expected_flap, rtol=1e-3)


def test_flap_ignores_a_constant_channel_that_wanda_keeps():
    """A channel whose activation never fluctuates carries no information (its mean moves into a bias):
    FLAP scores it zero, Wanda-sp scores it by its size, sqrt(tokens) * |c| * sum |down_proj[:, j]|."""
    model = tiny_model("llama", mlp_bias=True)
    with torch.no_grad():  # channel 4 of layer 0: zero input weights, so silu(gate bias) * up bias on every token
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight[4] = 0
        mlp.up_proj.weight[4] = 0
        mlp.gate_proj.bias[4], mlp.up_proj.bias[4] = 2.0, 3.0
    constant = torch.nn.functional.silu(torch.tensor(2.0, dtype=torch.float64)) * 3.0
    x = _down_proj_inputs(model, 0, BATCHES)
    assert torch.allclose(x[:, 4], constant.expand(len(x)).to(x.dtype)) and float(constant) > 5  # constant, non-zero
    coupling = build_coupling(model)
    flap = score_groups(model, coupling.groups, get_estimator("flap"), lambda: BATCHES, False)["layers.0.mlp.channels"]
    wanda = score_groups(model, coupling.groups, get_estimator("wanda-sp"), lambda: BATCHES, False)["layers.0.mlp.channels"]
    others = torch.arange(37) != 4
    assert float(flap[4]) <= 1e-9 * float(flap[others].min()) and bool((flap[others] > 0).all())
    expected = len(x) ** 0.5 * float(constant) * mlp.down_proj.weight[:, 4].abs().sum().double()
    assert float(wanda[4]) == pytest.approx(float(expected), rel=1e-5)
    assert int(wanda.argmax()) == 4 and int(flap.argmin()) == 4  # Wanda keeps it first, FLAP removes it first


def test_fisher_is_the_sum_of_squared_mask_gradients():
    model = tiny_model("llama")
    coupling = build_coupling(model)
    scores = score_groups(model, coupling.groups, get_estimator("fisher"), lambda: BATCHES, False)
    expected = torch.zeros(37, dtype=torch.float64)
    for ids in BATCHES:  # dL/dm_j with a mask on channel j's activation, by autograd on an explicit mask
        mask = torch.ones(37, requires_grad=True)
        hook = model.model.layers[2].mlp.down_proj.register_forward_pre_hook(lambda m, args: (args[0] * mask,))
        model(input_ids=ids, labels=ids).loss.backward()
        hook.remove()
        expected += mask.grad.double().pow(2) / 2
        model.zero_grad(set_to_none=True)
    assert torch.allclose(scores["layers.2.mlp.channels"], expected, rtol=1e-3, atol=1e-12)


def test_obs_saliency_is_the_optimal_error_of_removing_a_column():
    from depgraph_llm.recovery.solvers import ridge

    model = tiny_model("llama")
    coupling = build_coupling(model)
    scores = score_groups(model, coupling.groups, get_estimator("obs"), lambda: BATCHES, False)
    x = _down_proj_inputs(model, 0, BATCHES)
    w = model.model.layers[0].mlp.down_proj.weight.detach().double()
    gram = x.T @ x
    damped = gram + ridge(gram, 0.01) * torch.eye(37, dtype=torch.float64)
    for j in (0, 11, 36):  # brute force: best change D with D[:, j] = -W[:, j] under the quadratic D H D^T
        kept = torch.tensor([i for i in range(37) if i != j])
        delta = torch.zeros_like(w)
        delta[:, j] = -w[:, j]
        rhs = damped[kept][:, [j]] @ w[:, [j]].T  # stationarity on the kept columns
        delta[:, kept] = torch.linalg.solve(damped[kept][:, kept], rhs).T
        increase = torch.einsum("oi,ij,oj->", delta, damped, delta)
        assert torch.isclose(scores["layers.0.mlp.channels"][j], increase, rtol=1e-3)
