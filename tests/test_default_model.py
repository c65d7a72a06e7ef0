"""The embedded real model (SmolLM2-135M-Instruct) end to end. Slow: run with `python -m pytest -m slow`."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from depgraph_llm import GroupKind, build_coupling
from depgraph_llm.calibration.sources import DEFAULT_EVAL_FILES, default_files, load_text
from depgraph_llm.checkpoint.loading import default_model_dir, load_model
from depgraph_llm.job.options import PruneOptions
from depgraph_llm.job.prune import run_prune
from depgraph_llm.evaluation.perplexity import perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_dir():
    return default_model_dir()


def test_default_model_groups(default_dir):
    model, _ = load_model(default_dir)
    coupling = build_coupling(model)
    assert not coupling.frozen_ops
    mlp, heads = coupling.of_kind(GroupKind.CHANNELS), coupling.of_kind(GroupKind.HEADS)
    assert len(mlp) == 30 and {g.size for g in mlp} == {1536}
    assert len(heads) == 30 and {(g.size, g.nested.size, g.unit_width) for g in heads} == {(3, 3, 64)}
    assert coupling.of_kind(GroupKind.HIDDEN)[0].size == 576


def test_prune_default_model_quarter(default_dir, tmp_path):
    result = run_prune(PruneOptions(ratio=0.25, out=tmp_path / "slim", show_progress=False))
    report = result.report
    assert abs(report["ratio_achieved"] - 0.25) <= 0.01
    assert report["perplexity"]["after"]["perplexity"] > report["perplexity"]["before"]["perplexity"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "slim").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "slim")
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reloaded = perplexity(model, tokenizer, load_text(default_files(DEFAULT_EVAL_FILES)), show_progress=False)
    assert reloaded.perplexity == pytest.approx(report["perplexity"]["after"]["perplexity"], rel=1e-6)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8


def test_default_model_nonuniform_quarter_loads_both_ways(default_dir, tmp_path):
    """25% with the log-increase schedule: a per_layer_config checkpoint whose perplexity after reloading (no
    remote code) equals the in-memory pruned model's, and whose remote code gives the same logits in a fresh
    process where depgraph-llm is not importable."""
    from depgraph_llm import load_pruned
    from tests.test_slim_checkpoints import _fresh_process_outputs

    out = tmp_path / "slim"
    result = run_prune(PruneOptions(ratio=0.25, out=out, schedule="log-increase", show_progress=False))
    widths = [row["mlp"] for row in result.report["layer_widths_after"]]
    assert len(set(widths)) > 1 and widths[0] > widths[-1]
    model = load_pruned(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "DepgraphForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == result.report["params_after"]
    reloaded = perplexity(model, tokenizer, load_text(default_files(DEFAULT_EVAL_FILES)), show_progress=False)
    assert reloaded.perplexity == result.report["perplexity"]["after"]["perplexity"]
    fresh = _fresh_process_outputs(out, tmp_path)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 17, 33, 2, 90, 41, 7]])).logits
    assert torch.equal(fresh["logits"], logits)
