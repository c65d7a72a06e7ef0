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
