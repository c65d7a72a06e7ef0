"""prune.py end to end on a tiny checkpoint, and one-line errors for bad input."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.cli_helpers import FAST, ROOT, run_prune, tree_digest


def test_prune_end_to_end(tiny_checkpoint, tmp_path):
    out = tmp_path / "slim"
    before = tree_digest(tiny_checkpoint)
    result = run_prune("--model", str(tiny_checkpoint), "--ratio", "0.3", "--out", str(out), *FAST,
                       "--eval-text", str(EVAL_TEXT))
    assert result.returncode == 0, result.stderr
    assert "ratio requested / achieved" in result.stdout and "perplexity" in result.stdout
    assert "units chosen by" in result.stdout and "channels: obs-reconstruction" in result.stdout
    assert tree_digest(tiny_checkpoint) == before  # the source is untouched
    for name in ("model.safetensors", "config.json", "tokenizer.json", "prune_report.json", "prune_plan.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "prune_report.json").read_text())
    plan = json.loads((out / "prune_plan.json").read_text())
    assert abs(report["ratio_achieved"] - 0.3) <= 0.01 and plan["estimator"] == "taylor" and plan["keep"]
    # the default OBS reconstruction re-chose the MLP channels: the plan and report say so, not only "taylor"
    mlp_groups = {name for name in plan["keep"] if name.endswith(".mlp.channels")}
    assert mlp_groups and plan["chosen_by"] == {name: "obs-reconstruction" for name in mlp_groups}
    assert report["chosen_by"]["channels"] == "obs-reconstruction"
    assert all(v == "taylor" for k, v in report["chosen_by"].items() if k != "channels")
    model = AutoModelForCausalLM.from_pretrained(out)
    # perplexity before/after equals HF's own loss on the same windows (an independent computation)
    for side, folder in (("before", tiny_checkpoint), ("after", out)):
        measured = report["perplexity"][side]
        assert measured["perplexity"] == pytest.approx(
            hf_perplexity(folder, measured["seq_len"], measured["windows"]), rel=1e-4), side
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("This License", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 4
    assert not list(tmp_path.glob(".slim.tmp-*"))  # no temp folder left behind


EVAL_TEXT = Path("/usr/share/common-licenses/GPL-3")


def hf_perplexity(folder: Path, seq_len: int, windows: int) -> float:
    """exp(mean token NLL) from transformers' own loss over the first `windows` windows of EVAL_TEXT."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(EVAL_TEXT.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    with torch.no_grad():
        losses = [model(input_ids=ids[i * seq_len:(i + 1) * seq_len][None],
                        labels=ids[i * seq_len:(i + 1) * seq_len][None]).loss for i in range(windows)]
    return math.exp(float(torch.stack(losses).mean()))


def test_graph_command_prints_groups(tiny_checkpoint):
    result = subprocess.run([sys.executable, "-m", "depgraph_llm.cli", "graph", str(tiny_checkpoint)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "layers.0.mlp.channels" in result.stdout and "2 x 2 q/kv" in result.stdout and "hidden" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--ratio", "1.5"], "--ratio 1.5 is outside (0, 1)"),
    (["--ratio", "0"], "--ratio 0.0 is outside (0, 1)"),
    (["--ratio", "0.2", "--importance", "nope"], "unknown importance estimator 'nope'"),
    (["--ratio", "0.2", "--round-to", "0"], "--round-to 0 must be a positive integer"),
])
def test_bad_arguments_one_line(tiny_checkpoint, tmp_path, args, message):
    result = run_prune("--model", str(tiny_checkpoint), "--out", str(tmp_path / "o"), *args)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr
    assert not (tmp_path / "o").exists()


def test_missing_model_path(tmp_path):
    result = run_prune("--model", str(tmp_path / "nothing"), "--ratio", "0.2")
    assert result.returncode == 2 and "does not exist" in result.stderr and result.stderr.count("\n") == 1


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_prune("--model", str(tmp_path / "empty"), "--ratio", "0.2")
    assert result.returncode == 2 and "has no config.json" in result.stderr


def test_existing_output_is_refused_and_untouched(tiny_checkpoint, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_prune("--model", str(tiny_checkpoint), "--ratio", "0.3", "--out", str(out), *FAST)
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_too_short_calibration_text(tiny_checkpoint, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    result = run_prune("--model", str(tiny_checkpoint), "--ratio", "0.3", "--out", str(tmp_path / "o"),
                       "--calibration", str(short), *FAST)
    assert result.returncode == 2 and "fewer than one window" in result.stderr
    assert not (tmp_path / "o").exists()


def test_same_inputs_and_seed_give_identical_checkpoints(tiny_checkpoint, tmp_path):
    """Every file but the report (which holds timings) is byte-identical across two runs."""
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert run_prune("--model", str(tiny_checkpoint), "--ratio", "0.3", "--out", str(out), "--no-eval",
                         *FAST).returncode == 0
    names = sorted(p.name for p in outs[0].iterdir() if p.name != "prune_report.json")
    assert "model.safetensors" in names and "prune_plan.json" in names
    assert names == sorted(p.name for p in outs[1].iterdir() if p.name != "prune_report.json")
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    assert torch.equal(*(AutoModelForCausalLM.from_pretrained(o).lm_head.weight for o in outs))
