"""The streaming path (one decoder layer in memory at a time, read from the shards, written out as soon as it is
final) against the in-memory path: the same weights bit for bit, the same config and perplexities; the sharded
output loads with plain from_pretrained in a fresh process; an interrupted run leaves nothing behind."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from depgraph_llm.checkpoint.loading import load_pruned
from depgraph_llm.job.options import PruneOptions
from depgraph_llm.job.prune import run_prune
from tests.cli_helpers import ROOT, plan_without_measurements
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
    left, right = load_pruned(a), load_pruned(b)  # per-layer widths load through our config classes
    sa, sb = left.state_dict(), right.state_dict()
    assert sorted(sa) == sorted(sb)
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    assert plan_without_measurements(a / "prune_plan.json") == plan_without_measurements(b / "prune_plan.json")


CASES = {
    "default-recipe": dict(),  # taylor (gradients layer by layer when streamed) + obs reconstruction
    "spilled-activations": dict(importance="wanda-sp", reconstruct="obs", activation_budget_mb=0),
    "spilled-gradients": dict(importance="taylor", reconstruct="ls", activation_budget_mb=0),
    "fisher-ls-local": dict(importance="fisher", reconstruct="ls", reconstruct_mode="local"),
    "l2-uniform": dict(importance="l2", reconstruct="none"),
    "wanda-sp-obs-reconstruction": dict(importance="wanda-sp", reconstruct="obs"),
    "flap-log-increase-ls-local": dict(importance="flap", schedule="log-increase", reconstruct="ls",
                                       reconstruct_mode="local"),
    "obs-ls": dict(importance="obs", reconstruct="ls"),
    "depth-angular": dict(importance="l2", schedule="depth", depth_metric="angular", reconstruct="none"),
    "layer-removed-obs": dict(importance="wanda-sp", layers_removed=1, reconstruct="obs"),
    "hidden": dict(importance="l1", hidden_ratio=0.25, reconstruct="none"),
    "heads-tp": dict(importance="wanda-sp", head_ratio=0.5, tp_size=2, reconstruct="ls"),
    "flap-bias": dict(importance="flap", reconstruct="bias", reconstruct_mode="local"),  # zero biases added, filled
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_streamed_prune_equals_in_memory_prune(name, checkpoint, tmp_path):
    memory, streamed = _both(checkpoint, tmp_path, **CASES[name])
    _assert_same_checkpoint(tmp_path / "memory", tmp_path / "streamed")
    assert memory.report["perplexity"]["before"] == streamed.report["perplexity"]["before"]
    assert memory.report["perplexity"]["after"] == streamed.report["perplexity"]["after"]
    assert streamed.report["streaming"]["output_dtype"] == "float32"
    assert (streamed.report["streaming"]["spilled_streams"] > 0) == ("activation_budget_mb" in CASES[name])


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


def test_terminated_streaming_run_removes_its_temporary_folder(checkpoint, tmp_path, monkeypatch, capsys):
    """A real SIGTERM (what `timeout` and job schedulers send) in the middle of writing the layers: the CLI exits
    143 with one line, and neither the output nor the dot-named temporary folder is left."""
    import os
    import signal

    from depgraph_llm.cli import commands as cli
    from depgraph_llm.layers import streaming

    original = streaming.ShardSink.write

    def write(self, index, name, layer):
        original(self, index, name, layer)
        if index == 1:
            assert [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary folder exists now
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(streaming.ShardSink, "write", write)
    previous = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "slim"
    try:
        code = cli.prune_main(["--model", str(checkpoint), "--out", str(out), "--streaming", "--importance", "l2",
                               "--reconstruct", "none", "--no-eval", "--round-to", "1", "--seq-len", "32",
                               "--calibration-samples", "2", "--ratio", "0.3"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143 and "interrupted" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_streaming_refuses_self_calibration_in_one_line(checkpoint, tmp_path):
    from depgraph_llm.errors import UserError

    with pytest.raises(UserError, match="pass --calibration FILE"):
        run_prune(PruneOptions(model=str(checkpoint), out=tmp_path / "x", streaming=True, calibration="self",
                               **SMALL))
    assert not (tmp_path / "x").exists()


PEAK_PROBE = """
import sys
from pathlib import Path
from depgraph_llm.checkpoint.loading import load_pruned
from depgraph_llm.job.options import PruneOptions
from depgraph_llm.job.prune import run_prune
from depgraph_llm.job.stage_memory import peak_rss, reset_peak
import torch, transformers  # imported before the baseline
reset_peak()
start = peak_rss()
run_prune(PruneOptions(model=sys.argv[1], out=Path(sys.argv[2]), streaming=sys.argv[3] == "stream", ratio=0.25,
                       importance="wanda-sp", reconstruct="none", calibration_samples=2, seq_len=16, round_to=8,
                       evaluate=False, show_progress=False))
print(peak_rss() - start)
"""


@pytest.mark.slow
def test_streaming_peak_memory_is_flat_in_depth(tmp_path):
    """Each layer holds 3 x 256 x 8192 MLP weights (25 MB in fp32): the in-memory path's peak grows by the weights
    of every extra layer, the streaming path's stays within two layers' worth from 4 to 16 layers."""
    import os

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    per_layer_weights = (3 * 256 * 8192 + 4 * 256 * 256) * 4

    def peak(layers: int, path: str) -> int:
        checkpoint = tmp_path / f"ck{layers}"
        if not checkpoint.exists():
            save_tiny_checkpoint(checkpoint, tie=True, num_hidden_layers=layers, hidden_size=256,
                                 intermediate_size=8192, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
        result = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(checkpoint), str(tmp_path / f"o{layers}{path}"),
                                 path], capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-2000:]
        return int(result.stdout.strip().splitlines()[-1])

    streamed = {layers: peak(layers, "stream") for layers in (4, 16)}
    memory = {layers: peak(layers, "memory") for layers in (4, 16)}
    print({"streamed": streamed, "memory": memory})
    assert memory[16] - memory[4] > 8 * per_layer_weights, memory  # the probe sees the weights of 12 more layers
    assert streamed[16] - streamed[4] < 2 * per_layer_weights, streamed


def test_streaming_dry_run_predicts_memory_and_writes_nothing(checkpoint, tmp_path):
    from depgraph_llm.job.memory_plan import layer_params

    result = run_prune(PruneOptions(model=str(checkpoint), out=tmp_path / "x", streaming=True, dry_run=True,
                                    importance="wanda-sp", reconstruct="ls", **SMALL))
    memory = result.report["memory"]
    assert memory["path"] == "streaming" and memory["predicted_peak_rss_bytes"] == sum(memory["terms_bytes"].values()) + max(
        sum(terms.values()) for terms in memory["stage_terms_bytes"].values())
    config = AutoModelForCausalLM.from_pretrained(checkpoint).config
    # one layer of the tiny model, by hand: q, k, v, o (4 heads / 2 KV of 12 on 48) + gate, up, down + 2 norms
    assert layer_params(config) == 48 * 12 * (4 + 4 + 2 + 2) + 3 * 48 * 64 + 2 * 48
    assert memory["stage_terms_bytes"]["importance"]["one_layer_loaded_and_sliced"] == 2 * layer_params(config) * 4
    assert not (tmp_path / "x").exists()


def test_device_option_runs_each_layer_there(checkpoint, tmp_path):
    """--device cpu takes the streaming path with layers moved to the device in turn (same bytes as without)."""
    from depgraph_llm.errors import UserError

    options = dict(importance="wanda-sp", reconstruct="ls", evaluate=False, **SMALL)
    run_prune(PruneOptions(model=str(checkpoint), out=tmp_path / "device", device="cpu", **options))
    run_prune(PruneOptions(model=str(checkpoint), out=tmp_path / "memory", **options))
    _assert_same_checkpoint(tmp_path / "device", tmp_path / "memory")
    assert json.loads((tmp_path / "device" / "prune_report.json").read_text())["streaming"]
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU is visible"):
            PruneOptions(model=str(checkpoint), device="cuda").validate()


@pytest.mark.slow
def test_output_keeps_the_source_dtype_on_both_paths(tmp_path):
    """A bfloat16 source gives bfloat16 slim checkpoints (the in-memory path prunes in float32 and casts back; the
    streaming path computes in bfloat16 with --dtype auto, statistics in float64)."""
    from tests.tiny import tiny_model, tiny_tokenizer

    model = tiny_model("llama", tie=True)
    model.config.architectures = ["LlamaForCausalLM"]
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tiny_tokenizer().save_pretrained(tmp_path / "bf16")
    for streaming in (False, True):
        out = tmp_path / f"out-{streaming}"
        run_prune(PruneOptions(model=str(tmp_path / "bf16"), out=out, streaming=streaming, importance="wanda-sp",
                               reconstruct="ls", evaluate=False, **SMALL))
        slim = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
        assert {p.dtype for p in slim.parameters()} == {torch.bfloat16}
        assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
