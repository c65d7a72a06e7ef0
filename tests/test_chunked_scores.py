"""Scoring a parameter a block of rows at a time (importance/chunked.py) gives exactly the unit scores of the whole
tensor, the way the scores were computed before (`Slice.unit_scores` on the whole float32 element scores)."""
import pytest
import torch

from depgraph_llm import build_coupling
from depgraph_llm.graph.groups import Slice
from depgraph_llm.importance import get_estimator, score_groups
from depgraph_llm.importance import chunked
from depgraph_llm.importance.base import slices_by_param
from tests.tiny import tiny_model


def _whole(score, param, grad, extra, uses):
    element = score(param.detach().float(), None if grad is None else grad.float(), extra)
    return [(g, s.unit_scores(element).double()) for g, s in uses]


def _assert_bitwise(a, b):
    assert [g for g, _ in a] == [g for g, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


@pytest.mark.parametrize("rows,cols", [(4099, 300), (300, 4099), (1000, 64)])
def test_blocks_of_rows_equal_the_whole_matrix_on_both_axes(rows, cols):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, cols, generator=generator).to(torch.bfloat16)
    sumsq = torch.rand(cols, generator=generator, dtype=torch.float64) * 10
    uses = [("columns", Slice("w", 1, (cols,), 0)), ("rows", Slice("w", 0, (rows,), 0)),
            ("column-blocks", Slice("w", 1, (cols // 4, 4), 0, offset=cols % 4, extent=cols))]
    wanda = get_estimator("wanda-sp").element_scores
    extra = {"sumsq": sumsq}
    for chunk_elements in (1, 5 * cols, 97 * cols):  # blocks of 1, 5 and 97 rows (the last one partial)
        got = chunked.param_unit_scores(wanda, weight, None, extra, uses, chunk_elements=chunk_elements)
        _assert_bitwise(got, _whole(wanda, weight, None, extra, uses))


def test_gradient_estimators_read_the_same_block_of_the_gradient():
    generator = torch.Generator().manual_seed(1)
    weight, grad = torch.randn(777, 130, generator=generator), torch.randn(777, 130, generator=generator)
    uses = [("c", Slice("w", 1, (130,), 0)), ("r", Slice("w", 0, (777,), 0))]
    for name in ("taylor", "taylor-vector"):
        score = get_estimator(name).element_scores
        got = chunked.param_unit_scores(score, weight, grad, None, uses, chunk_elements=130 * 40)
        _assert_bitwise(got, _whole(score, weight, grad, None, uses))


def test_random_scores_are_computed_whole():
    weight = torch.randn(200, 30)
    uses = [("c", Slice("w", 1, (30,), 0))]
    score = get_estimator("random").element_scores
    torch.manual_seed(5)
    got = chunked.param_unit_scores(score, weight, None, None, uses, row_wise=False, chunk_elements=1)
    torch.manual_seed(5)
    _assert_bitwise(got, _whole(score, weight, None, None, uses))


@pytest.mark.parametrize("estimator", ["l2", "l1", "wanda-sp", "flap", "taylor"])
def test_every_group_of_a_tiny_model_scores_the_same_in_blocks(estimator, monkeypatch):
    """Heads nested in KV groups, MLP channels, hidden channels and vocabulary rows (tied embedding/head)."""
    model = tiny_model("llama", tie=True, vocab_size=211)
    coupling = build_coupling(model)
    batches = [torch.randint(0, 211, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    groups = coupling.groups
    assert slices_by_param(model, groups, get_estimator(estimator).consumer_only)
    whole = score_groups(model, groups, get_estimator(estimator), lambda: batches, show_progress=False)
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 1)  # every 2-d parameter a row at a time
    blocks = score_groups(model, groups, get_estimator(estimator), lambda: batches, show_progress=False)
    assert sorted(whole) == sorted(blocks)
    for name in whole:
        assert torch.equal(whole[name], blocks[name]), name


def test_layer_by_layer_gradient_scores_in_blocks_equal_whole(tmp_path, monkeypatch):
    """The streamed Taylor path (importance/gradients.py) scores its embedding and layers in blocks too."""
    from depgraph_llm.importance.gradients import layerwise_gradient_scores
    from depgraph_llm.layers.streaming import StreamingSource
    from tests.tiny import save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path / "tiny", tie=True)
    batches = [torch.randint(0, 150, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def scores():
        source = StreamingSource(folder)
        return layerwise_gradient_scores(source, build_coupling(source.model).groups, get_estimator("taylor"),
                                         batches)

    whole = scores()
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 1)
    blocks = scores()
    assert sorted(whole) == sorted(blocks)
    for name in whole:
        assert torch.equal(whole[name], blocks[name]), name
