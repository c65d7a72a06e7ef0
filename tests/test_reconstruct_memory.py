"""The memory-lean reconstruction solve (Gram dropped before the solve, damping in place, targets on kept rows)
computes exactly what the plain formulas compute: the same weights, biases and errors, bit for bit."""
import pytest
import torch
from torch import nn

from depgraph_llm.recovery.reconstruct import _Consumer, _solve
from depgraph_llm.recovery.solvers import damped_inverse, ridge, solve_damped

DAMP = 0.01


def _plain(weight, bias, gram, sum_x, tokens, kept, method):
    """The textbook formulas (as the solve was written before it was made lean), float64."""
    b = bias if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    cross = gram @ weight.T + sum_x[:, None] * b
    sum_y = weight @ sum_x + tokens * b
    y_energy = torch.einsum("oi,ij,oj->", weight, gram, weight) + 2 * b @ (weight @ sum_x) + tokens * b @ b
    cross_without_bias = cross - sum_x[:, None] * b
    if method == "bias":
        new_weight, new_bias = weight[:, kept], sum_y / tokens - weight[:, kept] @ (sum_x / tokens)[kept]
    else:
        g = gram[kept][:, kept] + ridge(gram, DAMP) * torch.eye(len(kept), dtype=torch.float64)
        new_weight, new_bias = torch.linalg.solve(g, cross_without_bias[kept]).T, b

    def residual(w_kept, bias_vec):
        value = (torch.einsum("oi,ij,oj->", w_kept, gram[kept][:, kept], w_kept)
                 - 2 * torch.einsum("oi,io->", w_kept, cross[kept]) + 2 * bias_vec @ (w_kept @ sum_x[kept])
                 - 2 * bias_vec @ sum_y + tokens * bias_vec @ bias_vec + y_energy)
        return float(value.clamp_min(0) / y_energy.clamp_min(1e-30)) ** 0.5

    full = torch.zeros_like(weight)
    full[:, kept] = new_weight
    return full, new_bias, residual(weight[:, kept], b), residual(new_weight, new_bias)


@pytest.mark.parametrize("method,with_bias", [("ls", False), ("ls", True), ("bias", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_solve_equals_the_plain_formulas_bit_for_bit(method, with_bias, dtype):
    generator = torch.Generator().manual_seed(3)
    n_in, n_out, tokens = 1100, 70, 900  # 1100 > the 1024-row blocks of the outer-product update
    x = torch.randn(tokens, n_in, generator=generator, dtype=torch.float64)
    module = nn.Linear(n_in, n_out, bias=with_bias).to(dtype)
    keep = torch.rand(n_in, generator=generator) > 0.3
    consumer = _Consumer("mlp.down_proj", module, keep)
    consumer.stats.add_x(x)
    weight = module.weight.detach().double().clone()
    bias = module.bias.detach().double().clone() if with_bias else None
    gram, sum_x = consumer.stats.gram.clone(), consumer.stats.sum_x.clone()
    full, new_bias, before, after = _plain(weight, bias, gram, sum_x, tokens, keep.nonzero().flatten(), method)
    with torch.no_grad():
        got_before, got_after = _solve(consumer, method, DAMP, plan=None)
    assert torch.equal(module.weight, full.to(dtype))
    if with_bias:
        assert torch.equal(module.bias, new_bias.to(dtype))
    assert (got_before, got_after) == (before, after)
    assert consumer.stats.gram is None  # the Gram is released by the solve


def test_in_place_damping_restores_the_block_and_matches_the_identity_formula():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(50, 40, generator=generator, dtype=torch.float64)
    gram, rhs = x.T @ x, torch.randn(40, 7, generator=generator, dtype=torch.float64)
    copy = gram.clone()
    r = ridge(gram, DAMP)
    expected = torch.linalg.solve(gram + r * torch.eye(40, dtype=torch.float64), rhs).T
    assert torch.equal(solve_damped(gram, rhs, r), expected)
    assert torch.equal(gram, copy)
    assert torch.equal(damped_inverse(gram, DAMP), torch.linalg.inv(gram + r * torch.eye(40, dtype=torch.float64)))
    assert torch.allclose(damped_inverse(gram, DAMP) @ (gram + r * torch.eye(40, dtype=torch.float64)),
                          torch.eye(40, dtype=torch.float64), atol=1e-9)
    assert torch.equal(gram, copy)  # the inverse damped the diagonal in place and restored it


@pytest.mark.parametrize("block_bytes", [8 * 40 * 3, 8 * 40 * 64, 1 << 30])  # 3 rows, 64 rows, whole
def test_gram_accumulated_in_row_blocks_equals_the_whole_products(block_bytes, monkeypatch):
    from depgraph_llm.recovery import reconstruct

    monkeypatch.setattr(reconstruct, "GRAM_BLOCK_BYTES", block_bytes)
    generator = torch.Generator().manual_seed(5)
    batches = [torch.randn(33, 40, generator=generator) for _ in range(3)]
    stats = reconstruct._Stats()
    for x in batches:
        stats.add_x(x)
    expected = None
    for x in batches:  # the plain accumulation: X^T X of each batch, summed
        x = x.double()
        expected = x.T @ x if expected is None else expected + x.T @ x
    assert torch.equal(stats.gram, expected)
    assert stats.tokens == 99
