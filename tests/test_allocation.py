"""Every estimator and schedule through the prune job, replayed byte-identically by `apply`; per-kind ratios,
layer ranges and tensor-parallel rounding honoured exactly."""
import json

import pytest

from depgraph_llm.importance import ESTIMATORS
from depgraph_llm.job.options import PruneOptions
from depgraph_llm.job.replay_plan import run_apply
from depgraph_llm.job.prune import run_prune
from depgraph_llm.errors import UserError
from tests.tiny import save_tiny_checkpoint

SMALL = dict(seq_len=32, calibration_samples=2, eval_tokens=64, round_to=1, show_progress=False, evaluate=False,
             reconstruct="none")


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory):
    """5 layers, 64 MLP channels, 4 query / 2 KV heads: room for non-uniform schedules."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("deep") / "tiny", tie=True, num_hidden_layers=5,
                                intermediate_size=64)


def _prune_and_replay(checkpoint, tmp_path, **options):
    out = tmp_path / "pruned"
    result = run_prune(PruneOptions(model=str(checkpoint), out=out, **{**SMALL, **options}))
    replay = tmp_path / "replay"
    run_apply(out / "prune_plan.json", str(checkpoint), replay)
    assert (out / "model.safetensors").read_bytes() == (replay / "model.safetensors").read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((replay / "config.json").read_text())
    return result, json.loads((out / "prune_plan.json").read_text())


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_every_estimator_prunes_and_replays(estimator, deep_checkpoint, tmp_path):
    result, plan = _prune_and_replay(deep_checkpoint, tmp_path, ratio=0.3, importance=estimator, seed=3)
    assert plan["estimator"] == estimator and plan["seed"] == 3 and plan["keep"]
    assert abs(result.report["ratio_achieved"] - 0.3) <= 0.01


@pytest.mark.parametrize("schedule", ["global", "log-increase", "depth", "layers", "layers:2:4"])
def test_every_schedule_prunes_and_replays(schedule, deep_checkpoint, tmp_path):
    result, plan = _prune_and_replay(deep_checkpoint, tmp_path, ratio=0.3, schedule=schedule)
    assert abs(result.report["ratio_achieved"] - 0.3) <= 0.01
    widths = [row["mlp"] for row in result.report["layer_widths_after"]]
    if schedule == "log-increase":
        assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]
    if schedule == "depth":
        assert plan["removed_layers"]
    if schedule.startswith("layers"):
        start, stop = (1, 4) if schedule == "layers" else (2, 4)
        untouched = [row for row in result.report["layer_widths_after"] if not start <= row["layer"] < stop]
        assert all(row["mlp"] == 64 and row["q_heads"] == 4 for row in untouched)
        assert all(row["mlp"] < 64 for row in result.report["layer_widths_after"] if start <= row["layer"] < stop)


def test_per_kind_ratios_are_exact(deep_checkpoint, tmp_path):
    result, plan = _prune_and_replay(deep_checkpoint, tmp_path, ratio=0.3, head_ratio=0.5, tp_size=2)
    rows = result.report["layer_widths_after"]
    assert {row["q_heads"] for row in rows} == {2} and all(row["mlp"] % 2 == 0 for row in rows)
    assert plan["allocation"] == {"head_ratio": 0.5, "tp_size": 2}
    result, plan = _prune_and_replay(deep_checkpoint, tmp_path / "b", ratio=0.4, layers_removed=1)
    assert len(plan["removed_layers"]) == 1 and abs(result.report["ratio_achieved"] - 0.4) <= 0.01
    result, plan = _prune_and_replay(deep_checkpoint, tmp_path / "c", ratio=0.3, hidden_ratio=0.25)
    assert len(plan["keep"]["hidden"]) == 36  # 48 * 0.75, a multiple of the 4 query heads


def test_unreachable_per_kind_combination_is_one_clear_error(deep_checkpoint, tmp_path):
    with pytest.raises(UserError, match="cannot be reached.*nearest reachable ratio"):
        run_prune(PruneOptions(model=str(deep_checkpoint), out=tmp_path / "x", ratio=0.05, mlp_ratio=0.9, **SMALL))
    with pytest.raises(UserError, match="layers:A:B"):
        PruneOptions(model=str(deep_checkpoint), ratio=0.2, schedule="layers:x").validate()


def test_vocab_keep_shrinks_tokenizer_and_embeddings_together(deep_checkpoint, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "the software is provided as is, without warranty of any kind. you may copy and share it. " * 8
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    result, plan = _prune_and_replay(deep_checkpoint, tmp_path, ratio=0.3, vocab_keep=120, calibration=str(corpus))
    out = tmp_path / "pruned"
    old_tok, new_tok = AutoTokenizer.from_pretrained(deep_checkpoint), AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(new_tok) == 120 == model.config.vocab_size == model.get_input_embeddings().weight.shape[0]
    kept = plan["keep"]["model.embed_tokens.vocab"]
    assert len(kept) == 120 and abs(result.report["ratio_achieved"] - 0.3) <= 0.01
    # the calibration text tokenizes to the same pieces (ids renumbered), and any text still tokenizes
    old_ids, new_ids = old_tok(text).input_ids, new_tok(text).input_ids
    mapping = {old: new for new, old in enumerate(kept)}
    assert [mapping[i] for i in old_ids] == new_ids
    assert new_tok.decode(new_tok("zebra quokka 42").input_ids).strip() == "zebra quokka 42"
    assert new_tok.convert_ids_to_tokens(new_tok.eos_token_id) == old_tok.eos_token
    assert model.config.eos_token_id == new_tok.eos_token_id
    ids = torch.tensor([new_ids[:12]])
    out_ids = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out_ids.shape[1] == 17 and int(out_ids.max()) < 120


def test_tp_size_rejects_head_counts_it_cannot_shard():
    """--tp-size N: the query heads must divide by N, the KV heads must divide by N or divide N (replicated).
    With 6 query / 3 KV heads and N = 3 only kv = 3 survives (by hand: kv x q in {3, 6}); 4 / 2 and N = 2 lose
    only the single-head layout."""
    from depgraph_llm.planning.budget import Allocation, Widths

    def accepted(tp, kv_heads, q_per_kv):
        return {(kv, q) for kv in range(1, kv_heads + 1) for q in range(1, q_per_kv + 1)
                if Allocation(tp_size=tp).accepts(Widths(None, kv, q), kv_heads * q_per_kv)}

    assert accepted(3, 3, 2) == {(3, 1), (3, 2)}
    assert accepted(2, 2, 2) == {(1, 2), (2, 1), (2, 2)}
    assert accepted(1, 3, 2) == {(kv, q) for kv in (1, 2, 3) for q in (1, 2)}


def test_tp_size_is_honoured_end_to_end(tmp_path_factory, tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("tp") / "tiny", tie=True, num_attention_heads=6,
                                      num_key_value_heads=3, head_dim=8, intermediate_size=64)
    result, plan = _prune_and_replay(checkpoint, tmp_path, ratio=0.3, tp_size=3)
    rows = result.report["layer_widths_after"]
    assert all(row["kv_heads"] == 3 and row["q_heads"] in (3, 6) and row["mlp"] % 3 == 0 for row in rows)
    assert plan["allocation"] == {"tp_size": 3} and abs(result.report["ratio_achieved"] - 0.3) <= 0.01


@pytest.mark.parametrize("extra", [{}, {"head_ratio": 0.5}, {"schedule": "search"}])
def test_unreachable_ratio_fails_before_any_calibration_pass(deep_checkpoint, tmp_path, monkeypatch, extra):
    """An out-of-reach ratio is refused before the scores are computed (no gradient pass is ever started), with the
    message the planner gives once the model is scored (the oracle: plan_uniform on the estimator's real scores)."""
    from depgraph_llm.checkpoint.loading import load_model
    from depgraph_llm.importance import get_estimator, score_groups
    from depgraph_llm.job import in_memory
    from depgraph_llm.job.options import allocation_for
    from depgraph_llm.planning.budget import ParamCounter, plan_uniform

    model, _ = load_model(deep_checkpoint)
    coupling = in_memory.couple_or_explain(model)
    counter = ParamCounter({n: tuple(p.shape) for n, p in model.named_parameters()}, coupling)
    scores = score_groups(model, coupling.groups, get_estimator("l2"))
    allocation = allocation_for({"ratio": 0.8, **extra}, len(model.model.layers))
    with pytest.raises(UserError) as scored:
        plan_uniform(coupling, counter, scores, 0.8, 1, lambda w: True, reference=counter.count({}),
                     allocation=allocation)

    def no_scores(*args, **kwargs):
        raise AssertionError("a calibration pass started for a ratio that no plan can reach")

    monkeypatch.setattr(in_memory, "score_groups", no_scores)
    with pytest.raises(UserError) as early:
        run_prune(PruneOptions(model=str(deep_checkpoint), out=tmp_path / "x", ratio=0.8, **{**SMALL, **extra}))
    assert "nearest reachable ratio" in str(early.value) and str(early.value) == str(scored.value)
    assert not (tmp_path / "x").exists()
    # a reachable ratio still scores the model (the check does not refuse what the planner accepts)
    with pytest.raises(AssertionError, match="calibration pass started"):
        run_prune(PruneOptions(model=str(deep_checkpoint), out=tmp_path / "y", ratio=0.3, **{**SMALL, **extra}))
