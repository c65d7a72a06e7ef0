"""Slim checkpoints of every shape the planner can produce: save, reload (in-process without remote code, and in a
fresh process where depgraph-llm is not importable, through the checkpoint's own remote code), identical logits
and greedy generations."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from depgraph_llm import load_pruned
from depgraph_llm.removal.apply import apply_plan
from depgraph_llm.graph.coupling import build_coupling
from depgraph_llm.job.output import save_checkpoint
from depgraph_llm.planning.plan import PrunePlan
from depgraph_llm.models import spec_for
from tests.tiny import tiny_model, tiny_tokenizer

PROMPT = torch.tensor([[5, 17, 33, 2, 90, 41, 7]])

# plan shapes: (MLP widths per layer, query heads kept per KV group per layer, KV groups kept per layer, removed)
SHAPES = {
    "uniform": ([30, 30, 30], [2, 2, 2], [2, 2, 2], []),
    "heterogeneous-mlp": ([30, 20, 37], [2, 2, 2], [2, 2, 2], []),
    "heterogeneous-heads": ([37, 37, 37], [1, 2, 2], [2, 2, 2], []),
    "gqa-dropped-kv-groups": ([37, 25, 37], [2, 2, 1], [2, 1, 1], []),
    "dropped-layers": ([30, 37, 20], [2, 2, 2], [2, 2, 2], [1]),
}


def _plan(model, coupling, shape) -> PrunePlan:
    mlp, q_per_kv, kv, removed = shape
    keep, keep_nested = {}, {}
    for group in coupling.groups:
        if group.kind.value == "channels":
            keep[group.name] = list(range(group.size))[::-1][:mlp[group.layer]][::-1]
        if group.kind.value == "heads":
            keep[group.name] = list(range(group.size))[-kv[group.layer]:]
            keep_nested[group.nested.name] = [list(range(q_per_kv[group.layer]))] * group.size
    params = sum(p.numel() for p in model.parameters())
    return PrunePlan("", "llama", "test", "test", 0, 0.1, 1, params, 0, keep=keep, keep_nested=keep_nested,
                     removed_layers=removed)


def _greedy(model) -> torch.Tensor:
    return model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=8, do_sample=False,
                          pad_token_id=0)


FRESH_PROCESS = textwrap.dedent("""
    import importlib.util, os, sys
    sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower() and "depgraph" not in repr(f).lower()]
    # the repository and everything inside it, but not a sibling that only shares a name prefix (a venv beside it)
    sys.path = [p for p in sys.path if p not in ("", ".", sys.argv[3]) and not p.startswith(sys.argv[3] + os.sep)]
    assert importlib.util.find_spec("depgraph_llm") is None and importlib.util.find_spec("models") is None
    import torch
    from transformers import AutoModelForCausalLM
    prompt = torch.tensor([[5, 17, 33, 2, 90, 41, 7]])
    results = {}
    for folder in sys.argv[1].split(os.pathsep):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(input_ids=prompt).logits
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=int(sys.argv[4]),
                                   do_sample=False, pad_token_id=0)
        results[folder] = {"logits": logits, "generated": generated, "class": type(model).__name__}
    torch.save(results, sys.argv[2])
""")


def fresh_process_outputs(folders, work_dir, new_tokens: int = 8) -> dict:
    """Load each folder with plain `from_pretrained(trust_remote_code=True)` in one fresh process where
    depgraph-llm is not importable; {folder: {"logits", "generated", "class"}}."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work_dir.mkdir(parents=True, exist_ok=True)
    result_file = work_dir / "fresh.pt"
    env = {**os.environ, "HF_MODULES_CACHE": str(work_dir / "hf_modules"), "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, os.pathsep.join(str(f) for f in folders),
                             str(result_file), root, str(new_tokens)],
                            capture_output=True, text=True, cwd=work_dir, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(result_file, weights_only=True)


def _fresh_process_outputs(folder, work_dir) -> dict:
    return fresh_process_outputs([folder], work_dir)[str(folder)]


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_slim_checkpoint_round_trip(shape, tmp_path):
    model = tiny_model(tie=shape == "uniform")
    coupling = build_coupling(model)
    plan = _plan(model, coupling, SHAPES[shape])
    apply_plan(model, coupling, plan, spec_for("llama"))
    plan.params_after = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        expected = model(input_ids=PROMPT).logits
    expected_tokens = _greedy(model)
    out = tmp_path / "slim"
    save_checkpoint(model, tiny_tokenizer(), out, plan, {"test": shape}, overwrite=False)
    config = json.loads((out / "config.json").read_text())
    heterogeneous = shape not in ("uniform", "dropped-layers") or SHAPES[shape][0][0] != SHAPES[shape][0][2]
    assert config["model_type"] == "llama"  # the stock type either way: config-only readers need no remote code
    assert config["architectures"] == ["DepgraphForCausalLM" if heterogeneous else "LlamaForCausalLM"]
    assert ("auto_map" in config) == heterogeneous == (out / "modeling_depgraph.py").exists()
    from transformers import AutoModelForCausalLM

    if heterogeneous:
        assert config["depgraph_per_layer_config"] and "per_layer_config" not in config
        assert config["num_hidden_layers"] == 3 - len(SHAPES[shape][3])
        with pytest.raises(RuntimeError, match="mismatched_sizes"):  # stock classes refuse the slim weights
            AutoModelForCausalLM.from_pretrained(out)
    else:
        stock = AutoModelForCausalLM.from_pretrained(out)  # plain loading, no remote code
        assert torch.equal(stock(input_ids=PROMPT).logits, expected)
    reloaded = load_pruned(out).eval()
    assert sum(p.numel() for p in reloaded.parameters()) == plan.params_after
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=PROMPT).logits, expected)
    assert torch.equal(_greedy(reloaded), expected_tokens)
    fresh = _fresh_process_outputs(out, tmp_path)
    assert torch.equal(fresh["logits"], expected) and torch.equal(fresh["generated"], expected_tokens)
    if heterogeneous:
        assert fresh["class"] == "DepgraphForCausalLM"


def test_heterogeneous_model_saves_again_and_trains_with_lora(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = tiny_model()
    coupling = build_coupling(model)
    plan = _plan(model, coupling, SHAPES["gqa-dropped-kv-groups"])
    apply_plan(model, coupling, plan, spec_for("llama"))
    save_checkpoint(model, tiny_tokenizer(), tmp_path / "a", plan, {}, overwrite=False)
    first = load_pruned(tmp_path / "a").eval()
    first.save_pretrained(tmp_path / "b")
    second = load_pruned(tmp_path / "b").eval()
    with torch.no_grad():
        assert torch.equal(first(input_ids=PROMPT).logits, second(input_ids=PROMPT).logits)
    lora = get_peft_model(second, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    optimizer = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(3):
        loss = lora(input_ids=PROMPT, labels=PROMPT).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    merged = lora.merge_and_unload()
    assert type(merged).__name__ == "DepgraphForCausalLM"
    assert merged.model.layers[1].self_attn.k_proj.out_features == 12  # one KV group of head_dim 12 left


def test_gguf_export_round_trip(tmp_path):
    """Export f32 and f16, read back with the gguf package (tensors, metadata) and with transformers' GGUF loader
    (which undoes llama.cpp's rotary row order): f32 logits are identical, f16 within half precision."""
    import gguf
    from transformers import AutoModelForCausalLM

    from tests.cli_helpers import run_cli

    model = tiny_model()
    coupling = build_coupling(model)
    plan = _plan(model, coupling, SHAPES["uniform"])
    apply_plan(model, coupling, plan, spec_for("llama"))
    save_checkpoint(model, tiny_tokenizer(), tmp_path / "slim", plan, {}, overwrite=False)
    with torch.no_grad():
        expected = model(input_ids=PROMPT).logits
    for dtype, tolerance in (("f32", 0.0), ("f16", 2e-2)):
        target = tmp_path / f"model-{dtype}.gguf"  # outside the source folder, which export never writes to
        result = run_cli("export-gguf", str(tmp_path / "slim"), "--out", str(target), "--dtype", dtype)
        assert result.returncode == 0, result.stderr[-2000:]
        reader = gguf.GGUFReader(str(target))
        fields = {f.name: f for f in reader.fields.values()}
        assert int(fields["llama.feed_forward_length"].parts[-1][0]) == 30
        assert int(fields["llama.block_count"].parts[-1][0]) == 3
        by_name = {t.name: t for t in reader.tensors}
        assert by_name["blk.0.ffn_up.weight"].shape.tolist() == [48, 30]  # GGUF lists dims fastest-first
        assert len(by_name) == len(model.state_dict())
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=target.name,
                                                      dtype=torch.float32)
        with torch.no_grad():
            gap = (loaded(input_ids=PROMPT).logits - expected).abs().max()
        assert gap <= tolerance, (dtype, gap)


def test_info_prints_widths_and_provenance(tmp_path):
    from tests.cli_helpers import run_cli

    model = tiny_model()
    coupling = build_coupling(model)
    plan = _plan(model, coupling, SHAPES["heterogeneous-mlp"])
    apply_plan(model, coupling, plan, spec_for("llama"))
    report = {"tool": {"version": "x"}, "source": {"path": "/src", "weights_sha256": "ab" * 32},
              "importance": "taylor", "schedule": "log-increase", "ratio_achieved": 0.2, "params_before": 1}
    save_checkpoint(model, tiny_tokenizer(), tmp_path / "slim", plan, report, overwrite=False)
    result = run_cli("info", str(tmp_path / "slim"))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    params = sum(p.numel() for p in model.parameters())
    assert f"{params / 1e6:.2f}M parameters" in text and "heterogeneous per-layer widths" in text
    widths = [line.split()[1] for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert widths == ["30", "20", "37"]
    assert "schedule log-increase" in text and "importance taylor" in text


@pytest.mark.slow  # ~27 s: one CLI subprocess per damaged folder
def test_info_and_export_refuse_bad_folders_in_one_line(tmp_path):
    from tests.cli_helpers import one_line_error, run_cli

    assert "no config.json" in one_line_error(run_cli("info", str(tmp_path / "missing")))
    assert "no config.json" in one_line_error(run_cli("export-gguf", str(tmp_path / "missing"), "--out",
                                                      str(tmp_path / "x.gguf")))
    model = tiny_model()
    model.save_pretrained(tmp_path / "damaged")
    weights = tmp_path / "damaged" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for args in (("info", str(tmp_path / "damaged")),
                 ("export-gguf", str(tmp_path / "damaged"), "--out", str(tmp_path / "d.gguf"))):
        assert "cannot read the weights" in one_line_error(run_cli(*args))
    assert not (tmp_path / "d.gguf").exists() and not list(tmp_path.glob(".d.gguf*"))


def test_per_layer_checkpoint_of_the_old_format_still_loads(tmp_path):
    """Folders written before the stock-type format (model_type `depgraph_<base>`, the map under transformers'
    `per_layer_config` key) still load with load_pruned."""
    model = tiny_model()
    coupling = build_coupling(model)
    plan = _plan(model, coupling, SHAPES["heterogeneous-mlp"])
    apply_plan(model, coupling, plan, spec_for("llama"))
    save_checkpoint(model, tiny_tokenizer(), tmp_path / "slim", plan, {}, overwrite=False)
    config_path = tmp_path / "slim" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(model_type="depgraph_llama", allow_global_per_layer_attribute_access=True,
                  per_layer_config=config.pop("depgraph_per_layer_config"))
    config_path.write_text(json.dumps(config))
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "slim").eval()(input_ids=PROMPT).logits,
                           model.eval()(input_ids=PROMPT).logits)
