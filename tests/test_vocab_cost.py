"""`--vocab-keep auto`: the dense model with a restricted vocabulary scores text exactly as the physically
vocabulary-pruned model does; the scorer's NLL per byte matches a hand computation; the choice is the fewest
tokens within the tolerance and inside the ratio's budget; through the prune job it prunes what is free, records
what it measured, replays byte for byte and refuses what it cannot do in one line."""
from __future__ import annotations

import copy
import json
import math
from collections import Counter

import pytest
import torch
from torch import nn

from depgraph_llm.errors import UserError
from depgraph_llm.job.options import PruneOptions
from depgraph_llm.job.prune import run_prune
from depgraph_llm.job.replay_plan import run_apply
from depgraph_llm.planning.vocab import kept_token_ids, restricted_tokenizer
from depgraph_llm.planning import vocab_cost
from depgraph_llm.planning.vocab_cost import (
    RestrictedVocabulary,
    choose_vocab_keep,
    counted_and_heldout,
    grid,
    nll_per_byte,
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


def test_choice_is_the_fewest_tokens_within_tolerance_inside_the_budget():
    rows = 4096  # grid: multiples of 256 from 256 to 3840
    assert grid(rows, 0) == list(range(256, 4096, 256))
    assert grid(rows, 1000) == list(range(1024, 4096, 256))

    def cost(keep: int) -> float:  # free down to 2300 tokens, then 1% per 100 tokens
        return 1.0 if keep >= 2300 else 1.0 + (2300 - keep) / 10_000

    calls = []
    choice = choose_vocab_keep(lambda k: calls.append(k) or cost(k), rows, floor=0, tolerance=0.02)
    # by hand: within 2% down to 2100; the smallest multiple of 256 at or above it is 2304
    assert choice.keep == 2304 and len(calls) <= 4
    assert choose_vocab_keep(cost, rows, floor=3000, tolerance=0.02).keep == 3072  # the budget binds
    assert choose_vocab_keep(lambda k: 2.0, rows, floor=0, tolerance=0.02).keep == rows  # nothing is free


def test_auto_prunes_a_vocabulary_the_text_does_not_use_and_replays(checkpoint, tmp_path):
    paragraph = ("the software is provided as is, without warranty of any kind. you may copy,\n"
                 "modify and share it under the same terms.\n")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(paragraph * 400)
    out = tmp_path / "pruned"
    result = run_prune(PruneOptions(model=str(checkpoint), out=out, ratio=0.3, vocab_keep="auto",
                                    calibration=str(corpus), **SMALL))
    record = result.report["vocabulary"]
    measured = {m["keep"]: m["ppl_ratio"] for m in record["measured"]}
    assert record["keep"] < VOCAB and measured[record["keep"]] <= 1 + record["tolerance"]
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == record["keep"] == len(json.loads((out / "prune_plan.json").read_text())
                                                         ["keep"]["model.embed_tokens.vocab"])
    assert abs(result.report["ratio_achieved"] - 0.3) <= 0.01
    replay = tmp_path / "replay"
    run_apply(out / "prune_plan.json", str(checkpoint), replay)
    assert (out / "model.safetensors").read_bytes() == (replay / "model.safetensors").read_bytes()


def test_auto_vocabulary_refusals_are_one_line(checkpoint, tmp_path):
    with pytest.raises(UserError, match="--vocab-keep auto.*--streaming"):
        run_prune(PruneOptions(model=str(checkpoint), out=tmp_path / "s", ratio=0.2, vocab_keep="auto",
                               streaming=True, **SMALL))
    with pytest.raises(UserError, match="--vocab-keep many"):
        PruneOptions(model=str(checkpoint), ratio=0.2, vocab_keep="many").validate()
    with pytest.raises(UserError, match="--vocab-tolerance"):
        PruneOptions(model=str(checkpoint), ratio=0.2, vocab_keep="auto", vocab_tolerance=-0.1).validate()
    assert not (tmp_path / "s").exists()
