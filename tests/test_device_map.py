"""--device-map: a model placed by accelerate (hooks on every block) prunes to the same weights as the plain model,
maps that offload weights are refused in one line, and the option parses what accelerate accepts. No GPU is
needed: accelerate's hooks are forced on with every block on the CPU, which runs the same hooked forwards, the
same in-place slicing and the same save as a multi-GPU map (the device moves themselves need GPUs to exercise)."""
from __future__ import annotations

import json

import pytest
import torch
from accelerate import dispatch_model
from accelerate.hooks import AlignDevicesHook
from transformers import AutoModelForCausalLM

from depgraph_llm.checkpoint.device_map import parse_device_map
from depgraph_llm.checkpoint.loading import load_model
from depgraph_llm.errors import UserError
from depgraph_llm.job.in_memory import prune_in_memory
from depgraph_llm.job.options import PruneOptions
from depgraph_llm.job.output import save_checkpoint
from depgraph_llm.job.prune import run_prune
from tests.cli_helpers import one_line_error, run_prune as run_prune_cli
from tests.tiny import save_tiny_checkpoint

SMALL = dict(seq_len=32, calibration_samples=2, round_to=1, show_progress=False, ratio=0.3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("device-map") / "tiny", num_hidden_layers=3,
                                intermediate_size=64)


def _block_map(model) -> dict[str, str]:
    names = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(len(model.model.layers))), "model.norm",
             "model.rotary_emb", "lm_head"]
    return {name: "cpu" for name in names}


def _pruned(model, tokenizer, out, options: PruneOptions):
    torch.manual_seed(0)
    windows = [torch.randint(3, tokenizer.vocab_size, (1, options.seq_len)) for _ in range(options.calibration_samples)]
    plan, _ = prune_in_memory(model, windows, options)
    save_checkpoint(model, tokenizer, out, plan, {}, overwrite=False)
    return plan


@pytest.mark.parametrize("recipe", [dict(), dict(importance="wanda-sp", reconstruct="ls", head_ratio=0.5)])
def test_model_placed_by_accelerate_hooks_prunes_like_the_plain_model(checkpoint, tmp_path, recipe):
    """Oracle: the same prune on the same weights without any placement. Hooks must not change a score, a refit or
    a saved byte, and the output must load with plain from_pretrained (no hook state leaks into it)."""
    options = PruneOptions(model=str(checkpoint), **SMALL, **recipe)
    plain, tokenizer = load_model(checkpoint)
    placed, _ = load_model(checkpoint)
    dispatch_model(placed, device_map=_block_map(placed), main_device="cpu", force_hooks=True)
    assert isinstance(placed.model.layers[1]._hf_hook, AlignDevicesHook) and placed.hf_device_map
    plain_plan = _pruned(plain, tokenizer, tmp_path / "plain", options)
    placed_plan = _pruned(placed, tokenizer, tmp_path / "placed", options)
    assert placed_plan.keep == plain_plan.keep and placed_plan.keep_nested == plain_plan.keep_nested
    left = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").state_dict()
    right = AutoModelForCausalLM.from_pretrained(tmp_path / "placed").state_dict()
    assert sorted(left) == sorted(right)
    assert [k for k in left if not torch.equal(left[k], right[k])] == []
    assert json.loads((tmp_path / "placed" / "config.json").read_text()) == json.loads(
        (tmp_path / "plain" / "config.json").read_text())


def test_device_map_without_a_gpu_keeps_the_model_on_the_cpu(checkpoint, tmp_path, caplog):
    """`--device-map auto` on a machine without GPUs: a warning, and the same checkpoint as a run without it."""
    plain = run_prune(PruneOptions(model=str(checkpoint), out=tmp_path / "plain", evaluate=False, **SMALL))
    with caplog.at_level("WARNING"):
        mapped = run_prune(PruneOptions(model=str(checkpoint), out=tmp_path / "auto", evaluate=False,
                                        device_map="auto", **SMALL))
    assert any("no GPU is visible" in r.getMessage() for r in caplog.records)
    assert mapped.plan.keep == plain.plan.keep
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "auto" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


def test_offloading_map_is_refused_in_one_line_and_writes_nothing(checkpoint, tmp_path):
    model, _ = load_model(checkpoint)
    mapping = {**_block_map(model), "model.layers.1": "disk"}
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(mapping))
    result = run_prune_cli("--model", str(checkpoint), "--out", str(tmp_path / "out"), "--ratio", "0.3",
                           "--no-eval", "--device-map", str(map_file), "--calibration-samples", "1", "--seq-len", "16")
    line = one_line_error(result)
    assert "model.layers.1" in line and "--streaming" in line
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["map.json"]


def test_map_naming_a_gpu_without_one_is_refused(checkpoint, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_prune_cli("--model", str(checkpoint), "--out", str(tmp_path / "out"), "--ratio", "0.3", "--no-eval",
                           "--device-map", '{"": 0}')
    assert "no CUDA GPU is visible" in one_line_error(result)


@pytest.mark.parametrize("spec, problem", [
    ("fastest", "neither a strategy"), ('{"model": "gpu7"}', "is not a device"), ("{}", "non-empty"),
    ('{"model": 0,', "not valid JSON"), ('{"model": true}', "is not a device")])
def test_bad_device_maps_name_the_problem(spec, problem):
    with pytest.raises(UserError, match=problem):
        parse_device_map(spec)


def test_device_maps_accelerate_accepts_are_parsed(tmp_path):
    assert parse_device_map("balanced_low_0") == "balanced_low_0"
    mapping = {"model.embed_tokens": 0, "model.layers.0": "cuda:1", "lm_head": "cpu", "model.norm": "disk"}
    (tmp_path / "m.json").write_text(json.dumps(mapping))
    assert parse_device_map(str(tmp_path / "m.json")) == mapping
    assert parse_device_map(json.dumps(mapping)) == mapping


def test_device_map_cannot_be_combined_with_streaming(checkpoint, tmp_path):
    with pytest.raises(UserError, match="--device-map .* --streaming"):
        PruneOptions(model=str(checkpoint), device_map="auto", streaming=True).validate()
