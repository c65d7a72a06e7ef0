"""Streaming a mixture-of-experts checkpoint: transformers 5 fuses the experts in memory (`experts.gate_up_proj`)
while `save_pretrained` stores them one by one (Mixtral also as `block_sparse_moe.experts.N.w1`); the streaming
path reads the stored layout through the same conversion and must prune exactly as the in-memory path does."""
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from depgraph_llm.checkpoint.loading import load_pruned
from depgraph_llm.checkpoint.shards import ShardReader
from depgraph_llm.checkpoint.stored_layout import StoredLayout
from depgraph_llm.layers.streaming import skeleton
from depgraph_llm.job.options import PruneOptions
from depgraph_llm.job.prune import run_prune
from tests.cli_helpers import plan_without_measurements
from tests.tiny import save_tiny_checkpoint

SMALL = dict(seq_len=32, calibration_samples=2, eval_tokens=64, round_to=4, show_progress=False, ratio=0.26)
MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                      shared_expert_intermediate_size=20),
}


@pytest.fixture(scope="module", params=sorted(MOE))
def moe_checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "tiny"
    return save_tiny_checkpoint(folder, request.param, **MOE[request.param])


def test_stored_layout_rebuilds_every_parameter_as_from_pretrained_does(moe_checkpoint):
    """The oracle is transformers' own loader: every parameter of the model it builds equals what the layout
    reads for that name from the per-expert files."""
    stored = ShardReader(moe_checkpoint).weight_map
    assert any(".experts.0." in name for name in stored)  # the files really hold the experts one by one
    loaded = AutoModelForCausalLM.from_pretrained(moe_checkpoint, dtype=torch.float32)
    layout = StoredLayout(ShardReader(moe_checkpoint), skeleton(moe_checkpoint, torch.float32))
    fused = [name for name in loaded.state_dict() if name.endswith("experts.gate_up_proj")]
    assert fused and all(name not in stored for name in fused)
    for name, value in loaded.state_dict().items():
        assert name in layout, name
        assert torch.equal(layout.get(name), value), name


def _reachable_ratio(checkpoint, options) -> float:
    """The ratio the dry run reports as reachable near SMALL's (tiny models have coarse steps)."""
    try:
        run_prune(PruneOptions(model=str(checkpoint), dry_run=True, **{**SMALL, **options}))
        return SMALL["ratio"]
    except Exception as error:  # noqa: BLE001 - the one-line error names the nearest reachable ratio
        return float(str(error).rsplit(" ", 1)[-1])


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(importance="wanda-sp", reconstruct="ls"),
                                     dict(importance="l2", reconstruct="none", experts_keep=3),
                                     dict(importance="l2", reconstruct="none", experts_keep=3,
                                          expert_reconstruct="router"),
                                     dict(importance="l2", reconstruct="none", experts_keep=3,
                                          expert_reconstruct="merge")],
                         ids=["channels-ls", "experts-removed", "experts-router-refit", "experts-merged"])
def test_streamed_moe_prune_equals_in_memory_prune(moe_checkpoint, tmp_path, options):
    options = {**options, "ratio": _reachable_ratio(moe_checkpoint, options)}
    memory = run_prune(PruneOptions(model=str(moe_checkpoint), out=tmp_path / "memory", **{**SMALL, **options}))
    streamed = run_prune(PruneOptions(model=str(moe_checkpoint), out=tmp_path / "streamed", streaming=True,
                                      **{**SMALL, **options}))
    assert streamed.report["streaming"]
    left, right = load_pruned(tmp_path / "memory"), load_pruned(tmp_path / "streamed")
    sa, sb = left.state_dict(), right.state_dict()
    assert sorted(sa) == sorted(sb)
    assert not [k for k in sa if not torch.equal(sa[k], sb[k])]
    plans = [plan_without_measurements(tmp_path / d / "prune_plan.json") for d in ("memory", "streamed")]
    assert plans[0] == plans[1]
    assert memory.report["perplexity"]["after"] == streamed.report["perplexity"]["after"]


@pytest.mark.slow
def test_streamed_moe_output_loads_with_plain_from_pretrained(moe_checkpoint, tmp_path):
    """A fresh process with none of our code loads the streamed (fused-name) output and gives its logits."""
    out = tmp_path / "streamed"
    options = dict(importance="l2", reconstruct="none", experts_keep=3)
    run_prune(PruneOptions(model=str(moe_checkpoint), out=out, streaming=True, evaluate=False,
                           **{**SMALL, **options, "ratio": _reachable_ratio(moe_checkpoint, options)}))
    ids = [[1, 5, 9, 20, 7]]
    expected = load_pruned(out)(torch.tensor(ids)).logits
    code = ("import sys, torch; from transformers import AutoModelForCausalLM as A; "
            f"m = A.from_pretrained(sys.argv[1], dtype=torch.float32); "
            f"torch.save(m(torch.tensor({ids})).logits, sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "logits.pt")], check=True,
                   capture_output=True, cwd=tmp_path)
    assert torch.equal(torch.load(tmp_path / "logits.pt", weights_only=True), expected)
