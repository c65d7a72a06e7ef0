"""scripts/check_sharded_output.py reads only headers and finds a sharded checkpoint that does not match its
config (a wrong shape, a tensor the index names but no shard holds)."""
import importlib.util
import json

from depgraph_llm.checkpoint.shards import ShardWriter
from tests.cli_helpers import ROOT
from tests.tiny import tiny_model


def _checker():
    spec = importlib.util.spec_from_file_location("check_sharded_output", ROOT / "scripts" / "check_sharded_output.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.check


def _sharded(folder, model):
    folder.mkdir()
    writer = ShardWriter(folder, max_shard_bytes=20_000)  # several shards for a tiny model
    for name, tensor in model.state_dict().items():
        writer.add(name, tensor.clone())
    writer.finish()
    model.config.save_pretrained(folder)
    return folder


def test_a_matching_checkpoint_passes_and_a_wrong_width_or_missing_tensor_fails(tmp_path):
    check = _checker()
    model = tiny_model("llama")
    folder = _sharded(tmp_path / "good", model)
    summary = check(folder)
    assert summary["problems"] == [] and summary["shards"] > 1
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 36}))
    assert any("mlp.down_proj.weight" in p for p in check(folder)["problems"])
    (folder / "config.json").write_text(json.dumps(config))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.extra.weight"] = next(iter(index["weight_map"].values()))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert any("the index names" in p for p in check(folder)["problems"])
