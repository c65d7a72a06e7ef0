"""`--vocab-keep auto`: the dense model with a restricted vocabulary scores text exactly as the physically
vocabulary-pruned model does; the scorer's NLL per byte matches a hand computation; the search finds the lowest
cost a brute force finds; through the prune job each measured cost is what the saved checkpoint of that plan
scores in a fresh load on the dense model's continuations (the criterion) and on held-out calibration text, the
choice replays byte for byte, and what it cannot do is refused in one line."""
from __future__ import annotations

import copy
import hashlib
import json
import math
from collections import Counter

import pytest
import torch
from torch import nn

from depgraph_llm.calibration.self_generation import continued_text
from depgraph_llm.errors import UserError
from depgraph_llm.job import vocab_choice
from depgraph_llm.job.options import PruneOptions
from depgraph_llm.job.prune import run_prune
from depgraph_llm.job.replay_plan import run_apply
from depgraph_llm.checkpoint.loading import load_model
from depgraph_llm.planning.vocab import kept_token_ids, restricted_tokenizer
from depgraph_llm.planning import vocab_cost
from depgraph_llm.planning.vocab_cost import (
    RestrictedVocabulary,
    counted_and_heldout,
    grid,
    lowest_cost,
    nll_per_byte,
    search_steps,
)
from tests.tiny import LICENSES, tiny_model, tiny_tokenizer

VOCAB = 1024
SMALL = dict(seq_len=32, calibration_samples=2, eval_tokens=64, round_to=1, show_progress=False, evaluate=False,
             reconstruct="none")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("vocab") / "tiny"
    model = tiny_model(vocab_size=len(tokenizer), num_hidden_layers=2)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _physically_pruned(model: nn.Module, kept: list[int]) -> nn.Module:
    """The vocabulary-pruned model built by hand: new embedding and LM-head modules holding the kept rows."""
    pruned = copy.deepcopy(model)
    index = torch.tensor(kept)
    embedding = nn.Embedding(len(kept), model.config.hidden_size)
    embedding.weight.data = model.get_input_embeddings().weight.data[index].clone()
    head = nn.Linear(model.config.hidden_size, len(kept), bias=False)
    head.weight.data = model.get_output_embeddings().weight.data[index].clone()
    pruned.set_input_embeddings(embedding)
    pruned.set_output_embeddings(head)
    pruned.config.vocab_size = len(kept)
    return pruned.eval()


def test_restricted_vocabulary_scores_like_the_physically_pruned_model(tokenizer):
    model = tiny_model(vocab_size=len(tokenizer), num_hidden_layers=2).eval()
    text = (LICENSES / "MPL-2.0").read_text()[:3000]  # not the tokenizer's training text: some words split
    counts = Counter(tokenizer((LICENSES / "GPL-2").read_text()[:5000]).input_ids)
    kept = kept_token_ids(tokenizer, counts, 400, len(tokenizer))
    small_tokenizer = restricted_tokenizer(tokenizer, kept)
    ids = torch.tensor([small_tokenizer(text, add_special_tokens=False).input_ids[:200]])
    assert int(ids.max()) < 400
    with torch.no_grad():
        expected = _physically_pruned(model, kept)(input_ids=ids).logits
        restricted = RestrictedVocabulary(model, kept)(input_ids=ids).logits
    torch.testing.assert_close(restricted, expected, atol=1e-5, rtol=1e-5)


class _Uniform(nn.Module):
    """Equal logits over `vocab` tokens: every prediction costs ln(vocab) nats."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, **kwargs):
        return type("Output", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def test_nll_per_byte_of_a_uniform_model_is_ln_v_per_predicted_token(tokenizer):
    text = (LICENSES / "BSD").read_text()
    seq_len = 50
    ids = tokenizer(text, add_special_tokens=False).input_ids
    windows = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    predicted = sum(len(w) - 1 for w in windows if len(w) > 1)
    n_bytes = sum(len(tokenizer.decode(w[1:]).encode()) for w in windows if len(w) > 1)
    nll, measured_bytes, measured_predicted = nll_per_byte(_Uniform(len(tokenizer)), tokenizer, text, seq_len)
    assert (measured_bytes, measured_predicted) == (n_bytes, predicted)
    assert nll == pytest.approx(math.log(len(tokenizer)) * predicted / n_bytes, rel=1e-6)  # float32 log-softmax


def test_heldout_chunks_are_disjoint_from_counted_ones_and_cover_every_text():
    texts = ["".join(f"{name} line {i:04d} " + "x" * 90 + "\n" for i in range(200)) for name in ("alpha", "beta")]
    counted, heldout = counted_and_heldout(texts)
    counted_lines, heldout_lines = set(counted.splitlines()), set(heldout.splitlines())
    assert counted_lines and heldout_lines and not counted_lines & heldout_lines
    assert {line.split()[0] for line in heldout_lines} == {"alpha", "beta"}
    assert len(counted_lines) + len(heldout_lines) <= 400
    assert len(heldout) <= vocab_cost.HELDOUT_CHARS + vocab_cost.CHUNK_CHARS + 200


def test_search_finds_the_lowest_cost_of_a_brute_force():
    rows = 4096  # grid: multiples of 256 from 256 to 3840, then the whole vocabulary
    assert grid(rows, 0) == list(range(256, 4096, 256))
    assert grid(rows, 1000) == list(range(1024, 4096, 256))  # the floor rounds up onto a multiple of 256
    assert grid(rows, 1100) == [1152, *range(1280, 4096, 256)]  # the floor itself, rounded up to 64 rows
    assert grid(rows, 1) == grid(rows, 0)  # floor 1: the vocabulary alone cannot pay, no floor candidate
    candidates = [*grid(rows, 0), rows]
    valleys = [lambda k, c=c: (k - c) ** 2 / 1e6 + 1.0 for c in (300, 1700, 2304, 3500, 4096, 9000)]
    valleys += [lambda k: math.inf if k < 1000 else 1.0 + abs(k - 2000) / 1e4,  # below the tokens text needs
                lambda k: 1.0]  # flat: the larger vocabulary wins the tie
    for cost in valleys:
        calls = []
        best, costs = lowest_cost(candidates, lambda k, cost=cost: calls.append(k) or cost(k))
        brute = min(candidates, key=lambda k, cost=cost: (cost(k), -k))
        assert best == brute and costs == {k: cost(k) for k in calls}
        assert len(calls) == len(set(calls)) <= search_steps(len(candidates)) < len(candidates)
    assert lowest_cost([rows], lambda k: 1.0) == (rows, {rows: 1.0})


PARAGRAPH = ("the software is provided as is, without warranty of any kind. you may copy,\n"
             "modify and share it under the same terms.\n")


def _dense_costs(checkpoint, tokenizer, texts: dict[str, str]) -> dict[str, tuple[float, int, int]]:
    dense = load_model(checkpoint)[0].eval()
    return {name: nll_per_byte(dense, tokenizer, text, SMALL["seq_len"]) for name, text in texts.items()}


def _scored_fresh(folder, dense: dict[str, tuple[float, int, int]], texts: dict[str, str]) -> dict[str, float]:
    """Perplexity ratio of the checkpoint in `folder`, loaded fresh, against the dense model, per text."""
    model, pruned_tokenizer = load_model(folder)
    ratios = {}
    for name, text in texts.items():
        nll, _, _ = nll_per_byte(model.eval(), pruned_tokenizer, text, SMALL["seq_len"])
        dense_nll, n_bytes, predicted = dense[name]
        ratios[name] = math.exp((nll - dense_nll) * n_bytes / predicted)
    return ratios


def test_continued_text_is_seeded_leaves_the_global_generator_alone_and_omits_the_openings(checkpoint, tokenizer):
    model = load_model(checkpoint)[0].eval()
    opening = tokenizer("zebra quartz", add_special_tokens=False).input_ids
    starts = [opening] * 5
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = continued_text(model, tokenizer, starts, 12, seed=7, batch=2)
    assert torch.equal(torch.get_rng_state(), before)
    assert first == continued_text(model, tokenizer, starts, 12, seed=7, batch=2)
    assert first != continued_text(model, tokenizer, starts, 12, seed=8, batch=2)
    assert "zebra" not in first and "quartz" not in first  # the openings are left out
    one = continued_text(model, tokenizer, starts[:1], 12, seed=7, batch=2)
    assert one.count("\n") >= 1 and first.count("\n") >= 5 and len(first) > 2 * len(one)  # one per opening


def test_openings_are_evenly_spaced_runs_of_the_heldout_tokens(tokenizer):
    text = " ".join(f"w{i}" for i in range(400))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    runs = vocab_cost.openings(tokenizer, text, count=4, length=5)
    assert runs[0] == ids[:5] and runs[-1] == ids[-5:] and len(runs) == 4
    assert all(any(ids[i:i + 5] == run for i in range(len(ids))) for run in runs)
    assert vocab_cost.openings(tokenizer, "w1", count=4, length=16) == [tokenizer("w1", add_special_tokens=False)
                                                                         .input_ids]


def test_auto_chooses_by_the_dense_continuations_and_replays(checkpoint, tokenizer, tmp_path):
    """Each measured cost is what the saved checkpoint of that plan scores in a fresh load, on the dense model's
    continuations (the criterion) and on the held-out calibration text (reported); the choice is the lowest
    continuation cost, here not the lowest held-out one, and replays byte for byte."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(PARAGRAPH * 400)
    out = tmp_path / "pruned"
    result = run_prune(PruneOptions(model=str(checkpoint), out=out, ratio=0.3, vocab_keep="auto",
                                    calibration=str(corpus), **SMALL))
    record = result.report["vocabulary"]
    measured = {m["keep"]: m for m in record["measured"] if m["ppl_ratio_without_reconstruction"] is not None}
    continuation = {k: m["ppl_ratio_without_reconstruction"] for k, m in measured.items()}
    heldout_cost = {k: m["heldout_ppl_ratio_without_reconstruction"] for k, m in measured.items()}
    assert record["keep"] < VOCAB and record["keep"] == min(continuation, key=lambda k: (continuation[k], -k))
    assert record["keep"] != min(heldout_cost, key=lambda k: (heldout_cost[k], -k))
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == record["keep"] == len(json.loads((out / "prune_plan.json").read_text())
                                                         ["keep"]["model.embed_tokens.vocab"])
    assert abs(result.report["ratio_achieved"] - 0.3) <= 0.01
    replay = tmp_path / "replay"
    run_apply(out / "prune_plan.json", str(checkpoint), replay)
    assert (out / "model.safetensors").read_bytes() == (replay / "model.safetensors").read_bytes()
    # the oracle: the continuations written again from the record (same text: sha256), two measured sizes pruned
    # by the numeric path (counts on the whole text, which ranks tokens as the held-out split's counts do for a
    # repeated paragraph), saved, loaded fresh and scored by hand on both texts
    _, heldout = counted_and_heldout([corpus.read_text()])
    facts = record["continuations"]
    written = continued_text(load_model(checkpoint)[0].eval(), tokenizer, vocab_cost.openings(tokenizer, heldout),
                             facts["new_tokens"], facts["seed"])
    assert hashlib.sha256(written.encode("utf-8")).hexdigest() == facts["sha256"]
    texts = {"continuations": written, "heldout": heldout}
    dense = _dense_costs(checkpoint, tokenizer, texts)
    for keep in sorted(measured)[-2:]:
        folder = tmp_path / f"keep-{keep}"
        run_prune(PruneOptions(model=str(checkpoint), out=folder, ratio=0.3, calibration=str(corpus),
                               vocab_keep=None if keep == VOCAB else keep, **SMALL))
        ratios = _scored_fresh(folder, dense, texts)
        assert ratios["continuations"] == pytest.approx(continuation[keep], abs=2e-4)
        assert ratios["heldout"] == pytest.approx(heldout_cost[keep], abs=2e-4)


def test_auto_compares_the_cheapest_size_and_every_token_plan_reconstructed(checkpoint, tokenizer, tmp_path,
                                                                            monkeypatch):
    """With a reconstruction asked for, the size the plain search found and the every-token plan are both scored
    reconstructed and the lower is kept; each reconstructed cost is what the saved checkpoint of that plan, pruned
    by a separate run with the same reconstruction, scores in a fresh load. The continuations are replaced by the
    held-out text here: on a random-weight model they are near uniform over the vocabulary, so the plain search
    would keep every token and there would be nothing to compare."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(PARAGRAPH * 400)
    _, heldout = counted_and_heldout([corpus.read_text()])
    monkeypatch.setattr(vocab_choice, "continued_text", lambda *args, **kwargs: heldout)
    options = dict(SMALL, reconstruct="ls", calibration=str(corpus))
    result = run_prune(PruneOptions(model=str(checkpoint), out=tmp_path / "auto", ratio=0.1, vocab_keep="auto",
                                    **options))
    record = result.report["vocabulary"]
    plain = {m["keep"]: m["ppl_ratio_without_reconstruction"] for m in record["measured"]}
    rebuilt = {m["keep"]: m["ppl_ratio_with_reconstruction"] for m in record["measured"]
               if m["ppl_ratio_with_reconstruction"] is not None}
    cheapest = min((k for k in plain if plain[k] is not None), key=lambda k: (plain[k], -k))
    assert set(rebuilt) == {cheapest, VOCAB} and cheapest < VOCAB  # the every-token plan is within reach at 0.1
    assert rebuilt[VOCAB] != plain[VOCAB]  # the every-token plan was scored after its refit, not before
    assert record["keep"] == min(rebuilt, key=lambda k: (rebuilt[k], -k))
    texts = {"heldout": heldout}
    dense = _dense_costs(checkpoint, tokenizer, texts)
    for keep, cost in rebuilt.items():
        folder = tmp_path / f"keep-{keep}"
        run_prune(PruneOptions(model=str(checkpoint), out=folder, ratio=0.1,
                               vocab_keep=None if keep == VOCAB else keep, **options))
        assert _scored_fresh(folder, dense, texts)["heldout"] == pytest.approx(cost, abs=2e-4)
    unreconstructed = run_prune(PruneOptions(model=str(checkpoint), out=tmp_path / "plain", ratio=0.1,
                                             vocab_keep="auto", **dict(options, reconstruct="none")))
    assert all(m["ppl_ratio_with_reconstruction"] is None for m in unreconstructed.report["vocabulary"]["measured"])


def test_auto_vocabulary_refusals_are_one_line(checkpoint, tmp_path):
    with pytest.raises(UserError, match="--vocab-keep auto.*--streaming"):
        run_prune(PruneOptions(model=str(checkpoint), out=tmp_path / "s", ratio=0.2, vocab_keep="auto",
                               streaming=True, **SMALL))
    with pytest.raises(UserError, match="--vocab-keep many"):
        PruneOptions(model=str(checkpoint), ratio=0.2, vocab_keep="many").validate()
    with pytest.raises(UserError, match="--vocab-keep auto.*--schedule search"):
        PruneOptions(model=str(checkpoint), ratio=0.2, vocab_keep="auto", schedule="search").validate()
    assert not (tmp_path / "s").exists()


def test_a_plan_names_its_kept_vocabulary_by_the_coupling_group(tokenizer):
    """The kept token ids are found through the group the coupling built for the token rows, whatever the
    other groups are called (an MLP channel group keeps its own list)."""
    from depgraph_llm import build_coupling
    from depgraph_llm.graph.groups import GroupKind
    from depgraph_llm.planning.plan import PrunePlan

    model = tiny_model(vocab_size=len(tokenizer), num_hidden_layers=1)
    coupling = build_coupling(model)
    vocab_groups = coupling.of_kind(GroupKind.VOCAB)  # untied: the embedding rows and the LM head rows
    assert len(vocab_groups) == 2
    channels = coupling.of_kind(GroupKind.CHANNELS)[0]
    kept = sorted(range(0, len(tokenizer), 3))
    plan = PrunePlan("", "llama", "test", "uniform", 0, 0.1, 1, 1, 1,
                     keep={channels.name: [0, 1], **{g.name: kept for g in vocab_groups}})
    assert plan.kept_vocabulary() == kept
    assert PrunePlan("", "llama", "test", "uniform", 0, 0.1, 1, 1, 1,
                     keep={channels.name: [0, 1]}).kept_vocabulary() is None
