"""Plain `AutoTokenizer.from_pretrained(dir)` on a per-layer checkpoint, as lm-eval and peft scripts do first: in a
fresh process with stdin closed, it must neither prompt for remote code nor warn, and must tokenize; nor may
`load_pruned` warn.

transformers' AutoTokenizer builds the model config from config.json before it reads the tokenizer files, so the
config must be one the stock classes read silently: the stock model_type, and the per-layer map under our own key
(stock validators read head counts through the global fields, which refuse or warn for a per-layer attribute)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from depgraph_llm.graph.coupling import build_coupling
from depgraph_llm.models import spec_for
from depgraph_llm.job.output import save_checkpoint
from depgraph_llm.removal.apply import apply_plan
from tests.test_slim_checkpoints import SHAPES, _plan
from tests.tiny import tiny_model, tiny_tokenizer

LOAD = textwrap.dedent("""
    import sys
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    print("IDS", tokenizer.encode("hello world"))
""")
LOAD_MODEL = textwrap.dedent("""
    import sys
    from depgraph_llm import load_pruned
    print("CLASS", type(load_pruned(sys.argv[1])).__name__)
""")


@pytest.mark.parametrize("shape", ["heterogeneous-mlp", "heterogeneous-heads", "gqa-dropped-kv-groups"])
def test_per_layer_checkpoint_tokenizer_loads_silently(tmp_path, shape):
    model = tiny_model()
    coupling = build_coupling(model)
    plan = _plan(model, coupling, SHAPES[shape])
    apply_plan(model, coupling, plan, spec_for("llama"))
    tokenizer = tiny_tokenizer()
    save_checkpoint(model, tokenizer, tmp_path / "slim", plan, {}, overwrite=False)
    assert "depgraph_per_layer_config" in json.loads((tmp_path / "slim" / "config.json").read_text())
    run = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "slim")], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.rsplit("IDS ", 1)[1]) == tokenizer.encode("hello world")
    assert "custom code" not in run.stderr and "[y/N]" not in run.stderr and "[y/N]" not in run.stdout
    assert "model of type" not in run.stderr and "per-layer attribute" not in run.stderr
    model = subprocess.run([sys.executable, "-c", LOAD_MODEL, str(tmp_path / "slim")], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert "CLASS DepgraphForCausalLM" in model.stdout, model.stderr[-2000:]
    assert "per-layer attribute" not in model.stderr  # our own loader reads the dense globals on purpose
