"""Perplexity protocol equals a hand computation."""
import math

import torch

from depgraph_llm.evaluation.perplexity import perplexity
from tests.tiny import tiny_model, tiny_tokenizer


def test_perplexity_matches_hand_computation():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    text = (tiny_model.__doc__ or "") + " This program is free software; you can redistribute it. " * 20
    result = perplexity(model, tokenizer, text, seq_len=16, max_tokens=48, show_progress=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    nll, count = 0.0, 0
    for w in range(3):
        window = ids[w * 16:(w + 1) * 16]
        with torch.no_grad():
            logits = model(torch.tensor([window])).logits[0]
        for t in range(15):
            nll -= torch.log_softmax(logits[t], -1)[window[t + 1]].item()
            count += 1
    assert result.windows == 3
    assert math.isclose(result.perplexity, math.exp(nll / count), rel_tol=1e-6)


def _text() -> str:
    return "This program is free software; you can redistribute it and/or modify it. " * 30


def test_bytes_are_the_text_the_predicted_tokens_spell():
    """Oracle: the offsets mapping of the original text, not the tokenizer's decoder. The Metaspace decoder drops
    the leading space of each decoded window, so the two may differ by one byte per window."""
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    text = _text()
    result = perplexity(model, tokenizer, text, seq_len=16, max_tokens=48, show_progress=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = encoded.offset_mapping
    expected = sum(len(text[spans[w * 16 + 1][0]:spans[w * 16 + 15][1]].encode("utf-8")) for w in range(3))
    assert result.windows == 3 and expected >= 45  # at least a byte per predicted token
    assert abs(result.bytes - expected) <= result.windows


def test_nll_per_byte_of_a_uniform_model_is_log_vocab_per_byte():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: each predicted token costs ln(vocab) nats
    result = perplexity(model, tokenizer, _text(), seq_len=16, max_tokens=48, show_progress=False)
    vocab = model.config.vocab_size
    assert math.isclose(result.perplexity, vocab, rel_tol=1e-5)
    assert math.isclose(result.nll_per_byte, 45 * math.log(vocab) / result.bytes, rel_tol=1e-5)


def test_dense_equivalent_ratio_is_the_perplexity_ratio_under_one_tokenizer():
    from depgraph_llm.evaluation.perplexity import dense_equivalent_ratio

    tokenizer = tiny_tokenizer()
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ra = perplexity(a, tokenizer, _text(), seq_len=16, max_tokens=48, show_progress=False)
    rb = perplexity(b, tokenizer, _text(), seq_len=16, max_tokens=48, show_progress=False)
    assert ra.perplexity != rb.perplexity
    ratio = dense_equivalent_ratio(rb.nll_per_byte, ra.nll_per_byte, ra.bytes_per_token)
    assert math.isclose(ratio, rb.perplexity / ra.perplexity, rel_tol=1e-6)
