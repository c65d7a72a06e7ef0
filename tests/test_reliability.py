"""Bad input gets one line and a non-zero exit; nothing the user owns is modified; interrupted runs leave nothing."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from depgraph_llm import cli
from tests.cli_helpers import FAST, ROOT, error_line, one_line_error, run_cli, run_prune, tree_digest
from tests.tiny import save_tiny_checkpoint


@pytest.fixture()
def source(tiny_checkpoint, tmp_path):
    """A private copy of the tiny checkpoint, fingerprinted, for tests that damage or must not damage it."""
    folder = tmp_path / "src"
    shutil.copytree(tiny_checkpoint, folder)
    return folder


def test_truncated_safetensors(source, tmp_path):
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = tree_digest(source)
    line = one_line_error(run_prune("--model", str(source), "--ratio", "0.3", "--out", str(tmp_path / "o"), *FAST))
    assert "cannot load weights" in line
    assert tree_digest(source) == before and not (tmp_path / "o").exists()


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(256))
    line = one_line_error(run_prune("--model", str(bad), "--ratio", "0.3", "--out", str(tmp_path / "o"),
                                    cwd=tmp_path))
    assert "cannot read GGUF file" in line and not (tmp_path / "o").exists()


def test_not_a_causal_lm(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    line = one_line_error(run_prune("--model", str(folder), "--ratio", "0.3"))
    assert "not a causal LM" in line


def test_unknown_architecture_names_nearest(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "lamma", "architectures": ["LammaForCausalLM"]}))
    line = one_line_error(run_prune("--model", str(folder), "--ratio", "0.3"))
    assert "nearest supported one is 'llama'" in line and "docs/new-architecture.md" in line


def test_trace_failure_points_to_guide(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import depgraph_llm.pipeline as pipeline

    def broken(model):
        raise RuntimeError("unsupported op in forward\nmore detail")

    monkeypatch.setattr(pipeline, "build_coupling", broken)
    code = cli.main(["prune", str(tiny_checkpoint), "--ratio", "0.3", "--out", str(tmp_path / "o"), "--no-eval", *FAST])
    err = error_line(capsys.readouterr().err)
    assert code == 2
    assert "cannot trace 'llama'" in err and "new-architecture.md" in err and not (tmp_path / "o").exists()


def test_empty_calibration_text(source, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    line = one_line_error(run_prune("--model", str(source), "--ratio", "0.3", "--out", str(tmp_path / "o"),
                                    "--calibration", str(empty), *FAST))
    assert "empty" in line and not (tmp_path / "o").exists()


def test_dry_run_writes_nothing(source, tmp_path):
    before = tree_digest(tmp_path)
    result = run_prune("--model", str(source), "--ratio", "0.3", *FAST, "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "dry run: nothing was written" in result.stdout and "0.300" in result.stdout
    assert tree_digest(tmp_path) == before


def test_apply_replays_plan_byte_identically(source, tmp_path):
    first = tmp_path / "first"
    assert run_prune("--model", str(source), "--ratio", "0.3", "--out", str(first), "--no-eval",
                     "--reconstruct", "none", *FAST).returncode == 0
    replay = tmp_path / "replay"
    result = run_cli("apply", str(first / "prune_plan.json"), "--model", str(source), "--out", str(replay))
    assert result.returncode == 0, result.stderr
    assert (first / "model.safetensors").read_bytes() == (replay / "model.safetensors").read_bytes()


def test_apply_refuses_plan_of_another_model(source, tmp_path):
    first = tmp_path / "first"
    assert run_prune("--model", str(source), "--ratio", "0.3", "--out", str(first), "--no-eval",
                     "--reconstruct", "none", *FAST).returncode == 0
    other = save_tiny_checkpoint(tmp_path / "other", tie=True, seed=7)  # same shapes, other weights
    line = one_line_error(run_cli("apply", str(first / "prune_plan.json"), "--model", str(other),
                                  "--out", str(tmp_path / "o")))
    assert "was made for weights sha256" in line and not (tmp_path / "o").exists()


def test_apply_corrupt_plan(source, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text("{ not json")
    line = one_line_error(run_cli("apply", str(plan), "--model", str(source), "--out", str(tmp_path / "o")))
    assert "cannot read prune plan" in line


def test_disk_too_small(source, tmp_path, monkeypatch, capsys):
    import depgraph_llm.checkpoint.files as checkpoint

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    code = cli.main(["prune", str(source), "--ratio", "0.3", "--out", str(tmp_path / "o"), "--no-eval", *FAST])
    err = error_line(capsys.readouterr().err)
    assert code == 2 and err.startswith("error: not enough disk space")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_interrupt_while_saving_leaves_user_files(source, tmp_path, monkeypatch, capsys, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("previous result")
    before = tree_digest(tmp_path)

    def interrupted(self, *args, **kwargs):
        Path(args[0], "partial.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", interrupted)
    flags = ["--overwrite"] if existing else []
    code = cli.main(["prune", str(source), "--ratio", "0.3", "--out", str(out), "--no-eval", *flags, *FAST])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert tree_digest(tmp_path) == before  # the old --out (if any) is intact, no temp folder is left


def test_ctrl_c_in_a_real_process(source, tmp_path):
    out = tmp_path / "o"
    before = tree_digest(source)
    process = subprocess.Popen([sys.executable, str(ROOT / "prune.py"), "--model", str(source), "--ratio", "0.3",
                                "--out", str(out), *FAST, "--calibration-samples", "5000", "--seq-len", "16"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(6)  # imports, loading or the (deliberately long) gradient pass: the run takes > 15 s
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert process.returncode == 130 and "interrupted" in err.strip().splitlines()[-1]
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["src"]
    assert tree_digest(source) == before


def test_remote_code_never_runs_without_flag(source, tmp_path):
    marker = tmp_path / "code-ran"
    (source / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import LlamaConfig\n"
                                    "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n")
    config = json.loads((source / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    config["model_type"] = "evil"
    (source / "config.json").write_text(json.dumps(config))
    before = tree_digest(source)
    line = one_line_error(run_prune("--model", str(source), "--ratio", "0.3", "--out", str(tmp_path / "o"), *FAST))
    assert "--trust-remote-code" in line
    assert not marker.exists() and tree_digest(source) == before


def test_pickle_weights_are_refused(source, tmp_path):
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(source / "model.safetensors"), source / "pytorch_model.bin")
    (source / "model.safetensors").unlink()
    line = one_line_error(run_prune("--model", str(source), "--ratio", "0.3", "--out", str(tmp_path / "o"), *FAST))
    assert "safetensors" in line and not (tmp_path / "o").exists()
