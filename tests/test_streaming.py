"""The streaming path (one decoder layer in memory at a time, read from the shards, written out as soon as it is
final) against the in-memory path: the same weights bit for bit, the same config and perplexities; the sharded
output loads with plain from_pretrained in a fresh process; an interrupted run leaves nothing behind."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from depgraph_llm.pipeline import PruneOptions, run_prune
from tests.cli_helpers import ROOT
from tests.tiny import save_tiny_checkpoint

SMALL = dict(seq_len=32, calibration_samples=2, eval_tokens=64, round_to=1, show_progress=False, ratio=0.3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """4 layers, 64 MLP channels, tied embeddings (fp32)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("stream") / "tiny", tie=True, num_hidden_layers=4,
                                intermediate_size=64)


def _both(checkpoint, tmp_path, **options):
    memory = run_prune(PruneOptions(model=str(checkpoint), out=tmp_path / "memory", **{**SMALL, **options}))
    streamed = run_prune(PruneOptions(model=str(checkpoint), out=tmp_path / "streamed", streaming=True,
                                      **{**SMALL, **options}))
    return memory, streamed


def _assert_same_checkpoint(a, b):
    left, right = AutoModelForCausalLM.from_pretrained(a), AutoModelForCausalLM.from_pretrained(b)
    sa, sb = left.state_dict(), right.state_dict()
    assert sorted(sa) == sorted(sb)
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    assert json.loads((a / "prune_plan.json").read_text()) == json.loads((b / "prune_plan.json").read_text())


CASES = {
    "l2-uniform": dict(importance="l2", reconstruct="none"),
    "wanda-sp-obs-reconstruction": dict(importance="wanda-sp", reconstruct="obs"),
    "flap-log-increase-ls-local": dict(importance="flap", schedule="log-increase", reconstruct="ls",
                                       reconstruct_mode="local"),
    "obs-ls": dict(importance="obs", reconstruct="ls"),
    "depth-angular": dict(importance="l2", schedule="depth", depth_metric="angular", reconstruct="none"),
    "layer-removed-obs": dict(importance="wanda-sp", layers_removed=1, reconstruct="obs"),
    "hidden": dict(importance="l1", hidden_ratio=0.25, reconstruct="none"),
    "heads-tp": dict(importance="wanda-sp", head_ratio=0.5, tp_size=2, reconstruct="ls"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_streamed_prune_equals_in_memory_prune(name, checkpoint, tmp_path):
    memory, streamed = _both(checkpoint, tmp_path, **CASES[name])
    _assert_same_checkpoint(tmp_path / "memory", tmp_path / "streamed")
    assert memory.report["perplexity"]["before"] == streamed.report["perplexity"]["before"]
    assert memory.report["perplexity"]["after"] == streamed.report["perplexity"]["after"]
    assert streamed.report["streaming"]["output_dtype"] == "float32"


def test_sharded_output_loads_with_plain_from_pretrained(checkpoint, tmp_path):
    """Several shards plus model.safetensors.index.json; a fresh process (none of our classes registered) loads it
    with AutoModelForCausalLM.from_pretrained and gets the in-memory prune's logits exactly."""
    memory, streamed = _both(checkpoint, tmp_path, importance="wanda-sp", reconstruct="none", evaluate=False)
    out = tmp_path / "streamed"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 2 and set(index["weight_map"].values()) == set(shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    probe = ("import sys, torch; from transformers import AutoModelForCausalLM as M; "
             "ids = torch.arange(3, 20).unsqueeze(0); "
             "print(repr(M.from_pretrained(sys.argv[1]).eval()(input_ids=ids).logits.sum().item()))")
    logits = [subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, cwd=ROOT,
                             timeout=300) for path in (out, tmp_path / "memory")]
    assert all(r.returncode == 0 for r in logits), [r.stderr[-800:] for r in logits]
    assert logits[0].stdout.strip().splitlines()[-1] == logits[1].stdout.strip().splitlines()[-1]


def test_interrupted_streaming_run_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    from depgraph_llm.layers import streaming

    original = streaming.ShardSink.write

    def write(self, index, name, layer):
        if index == 2:
            raise KeyboardInterrupt
        original(self, index, name, layer)

    monkeypatch.setattr(streaming.ShardSink, "write", write)
    out = tmp_path / "slim"
    with pytest.raises(KeyboardInterrupt):
        run_prune(PruneOptions(model=str(checkpoint), out=out, streaming=True, importance="l2", reconstruct="none",
                               evaluate=False, **{k: v for k, v in SMALL.items()}))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_streaming_refuses_gradient_estimators_in_one_line(checkpoint, tmp_path):
    from depgraph_llm.errors import UserError

    with pytest.raises(UserError, match="needs gradients of the whole model"):
        run_prune(PruneOptions(model=str(checkpoint), out=tmp_path / "x", streaming=True, importance="taylor",
                               **SMALL))
    assert not (tmp_path / "x").exists()
