"""Bad input gets one line and a non-zero exit; nothing the user owns is modified; interrupted runs leave nothing."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from depgraph_llm.cli import commands as cli
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
    import depgraph_llm.job.in_memory as pipeline

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
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    received, started = bytearray(), threading.Event()

    def pump() -> None:  # the signal goes in once the (deliberately long) gradient pass has started
        for chunk in iter(lambda: process.stderr.read1(4096), b""):
            received.extend(chunk)
            if b"gradients" in received:
                started.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    started.wait(timeout=240)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=240)
    reader.join(timeout=10)
    err = received.decode("utf-8", errors="replace")
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


# --- the source is never the output ---------------------------------------------------------------------------------

def _refused(capsys, argv) -> str:
    code = cli.main(argv)
    line = error_line(capsys.readouterr().err)
    assert code == 2
    return line


@pytest.mark.parametrize("where", ["equal", "inside", "containing"])
def test_prune_refuses_out_at_the_source(source, tmp_path, capsys, where):
    out = {"equal": source, "inside": source / "slim", "containing": tmp_path}[where]
    before = tree_digest(tmp_path)
    line = _refused(capsys, ["prune", str(source), "--ratio", "0.3", "--out", str(out), "--overwrite", "--no-eval",
                             *FAST])
    relation = {"equal": "is", "inside": "is inside", "containing": "contains"}[where]
    assert f"{relation} the source {source.resolve()}" in line
    assert tree_digest(tmp_path) == before


def test_prune_default_out_inside_the_source_is_refused(source, capsys, monkeypatch):
    monkeypatch.chdir(source)  # the default --out is ./<model>-pruned-<ratio>, here inside the model folder
    before = tree_digest(source)
    line = _refused(capsys, ["prune", str(source), "--ratio", "0.3", "--no-eval", *FAST])
    assert "is inside the source" in line and tree_digest(source) == before


def _plan_file(folder: Path, source: Path, **changes) -> Path:
    """A prune_plan.json for `source` keeping 30 of 37 channels in every layer (or with `changes`)."""
    from safetensors.torch import load_file

    from depgraph_llm.checkpoint.files import weights_hash
    from depgraph_llm.planning.plan import PrunePlan

    before = sum(t.numel() for t in load_file(source / "model.safetensors").values())
    keep = {f"layers.{i}.mlp.channels": list(range(30)) for i in range(3)}
    plan = PrunePlan(weights_hash(source), "llama", "l2", "uniform", 0, 0.1, 1, before,
                     before - 3 * 3 * 48 * 7, keep)
    for key, value in changes.items():
        setattr(plan, key, value)
    path = folder / "prune_plan.json"
    path.write_text(plan.to_json())
    return path


@pytest.mark.parametrize("where", ["model", "plan folder"])
def test_apply_refuses_out_at_the_source(source, tmp_path, capsys, where):
    plans = tmp_path / "plans"
    plans.mkdir()
    plan = _plan_file(plans, source)
    out = source if where == "model" else plans
    before = tree_digest(tmp_path)
    line = _refused(capsys, ["apply", str(plan), "--model", str(source), "--out", str(out), "--overwrite"])
    assert "the source" in line and tree_digest(tmp_path) == before


def test_export_gguf_refuses_out_inside_the_source(source, capsys):
    before = tree_digest(source)
    line = _refused(capsys, ["export-gguf", str(source), "--out", str(source / "slim.gguf")])
    assert "is inside the source" in line and tree_digest(source) == before


def test_graphml_refuses_a_path_inside_the_source(source, capsys):
    before = tree_digest(source)
    line = _refused(capsys, ["graph", str(source), "--graphml", str(source / "config.json")])
    assert "--graphml" in line and "is inside the source" in line and tree_digest(source) == before


@pytest.mark.parametrize("where", ["model", "parent", "inside", "unrelated"])
def test_eval_report_dir_never_replaces_a_model_or_a_user_folder(source, tmp_path, capsys, where):
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "todo.txt").write_text("mine")
    report_dir = {"model": source, "parent": tmp_path, "inside": source / "reports",
                  "unrelated": unrelated}[where]
    before = tree_digest(tmp_path)
    line = _refused(capsys, ["eval", str(source), "--report-dir", str(report_dir), "--no-speed"])
    assert ("not an earlier evaluation report" if where == "unrelated" else "the source") in line
    assert tree_digest(tmp_path) == before


# --- plans: every index list is checked before anything is sliced -----------------------------------------------------

def test_apply_duplicated_index_names_the_group(source, tmp_path):
    keep = {f"layers.{i}.mlp.channels": list(range(30)) for i in range(3)}
    keep["layers.1.mlp.channels"] = [0, 1, 1, *range(3, 30)]
    plan = _plan_file(tmp_path, source, keep=keep)
    line = one_line_error(run_cli("apply", str(plan), "--model", str(source), "--out", str(tmp_path / "o")))
    assert "layers.1.mlp.channels lists index 1 more than once" in line and not (tmp_path / "o").exists()


def test_apply_edited_parameter_count_is_one_line(source, tmp_path, capsys):
    plan = _plan_file(tmp_path, source, params_after=12345)
    line = _refused(capsys, ["apply", str(plan), "--model", str(source), "--out", str(tmp_path / "o")])
    assert "says params_after 12345" in line and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def tiny_coupling():
    from depgraph_llm import build_coupling
    from tests.tiny import tiny_model

    model = tiny_model("llama", tie=True)
    return model, build_coupling(model)


MLP, HEADS, QUERIES = "layers.0.mlp.channels", "layers.0.self_attn.heads", "layers.0.self_attn.heads.query_per_kv"


@pytest.mark.parametrize("changes, message", [
    ({"keep": {MLP: [0, 2, 2, 5]}}, f"{MLP} lists index 2 more than once"),
    ({"keep": {MLP: [3, 1, 2]}}, f"{MLP} lists its indices out of order"),
    ({"keep": {MLP: [0, 37]}}, f"{MLP} has index 37 outside 0..36"),
    ({"keep": {MLP: [-1, 4]}}, f"{MLP} has index -1 outside 0..36"),
    ({"keep": {MLP: []}}, f"{MLP} keeps no unit"),
    ({"keep": {MLP: [0, 1.5]}}, f"{MLP} must be a list of integer indices"),
    ({"keep": {MLP: [True, 3]}}, f"{MLP} must be a list of integer indices"),
    ({"keep": {MLP: "0,1"}}, f"{MLP} must be a list of integer indices"),
    ({"keep": {"layers.7.mlp.channels": [0]}}, "group 'layers.7.mlp.channels', which this model does not have"),
    ({"keep": {"layers.0": [0]}}, "layers.0 is a layer group"),
    ({"keep": {HEADS: [1, 1]}}, f"{HEADS} lists index 1 more than once"),
    ({"keep": {HEADS: [2]}}, f"{HEADS} has index 2 outside 0..1"),
    ({"keep_nested": {QUERIES: [[0]]}}, f"{QUERIES} must have one row per KV group (2)"),
    ({"keep_nested": {QUERIES: [[0], [0, 1]]}}, f"{QUERIES} keeps different numbers of query heads"),
    ({"keep_nested": {QUERIES: [[1, 1], [0, 1]]}}, f"{QUERIES} lists index 1 more than once"),
    ({"keep_nested": {QUERIES: [[0], [2]]}}, f"{QUERIES} has index 2 outside 0..1"),
    ({"keep_nested": {QUERIES: [[], []]}}, f"{QUERIES} keeps no unit"),
    ({"keep_nested": {"layers.0.mlp.channels.query_per_kv": [[0], [0]]}}, "nested group"),
    ({"keep_nested": {HEADS: [[0], [0]]}}, "nested group"),
    ({"removed_layers": [1, 1]}, "removed_layers lists index 1 more than once"),
    ({"removed_layers": [3]}, "removed_layers has index 3 outside 0..2"),
    ({"removed_layers": [0, 1, 2]}, "removes every decoder layer"),
    ({"keep": [0, 1]}, "plan field keep must map group names"),
    ({"format": 99}, "plan format 99"),
    ({"model_type": "mistral"}, "made for model_type 'mistral'"),
])
def test_plan_checks_every_index_list(tiny_coupling, changes, message):
    from depgraph_llm.errors import UserError
    from depgraph_llm.models import spec_for
    from depgraph_llm.planning.plan import PrunePlan
    from depgraph_llm.removal.apply import apply_plan, mask_model

    model, coupling = tiny_coupling
    plan = PrunePlan("h", "llama", "l2", "uniform", 0, 0.1, 1, 0, 0)
    for key, value in changes.items():
        setattr(plan, key, value)
    with pytest.raises(UserError, match=None) as caught:
        plan.check_against(coupling, "llama")
    assert message in str(caught.value) and "\n" not in str(caught.value)
    if "model_type" not in changes:  # every entry point that slices goes through the same check, before slicing
        weights = {n: p.clone() for n, p in model.state_dict().items()}
        for entry in (mask_model, lambda m, c, p: apply_plan(m, c, p, spec_for("llama"))):
            with pytest.raises(UserError):
                entry(model, coupling, plan)
        assert all(torch.equal(weights[n], p) for n, p in model.state_dict().items())


def test_plan_check_accepts_what_the_planner_writes(tiny_coupling):
    from depgraph_llm.planning.plan import PrunePlan

    _, coupling = tiny_coupling
    plan = PrunePlan("h", "llama", "l2", "uniform", 0, 0.1, 1, 0, 0, keep={MLP: [0, 4, 36], HEADS: [1]},
                     keep_nested={QUERIES: [[0], [1]]}, removed_layers=[0, 2])
    plan.check_against(coupling, "llama")  # no error


@pytest.mark.parametrize("argv", [["recover", "{src}", "--out", "{src}", "--overwrite"],
                                  ["prune", "{src}", "--ratio", "0.3", "--recover", "lora", "--out", "{src}/r",
                                   "--no-eval"]])
def test_recover_refuses_out_at_the_source(source, tmp_path, capsys, argv):
    before = tree_digest(tmp_path)
    line = _refused(capsys, [a.format(src=source) for a in argv])
    assert "the source" in line and tree_digest(tmp_path) == before


def test_bias_reconstruction_without_a_bias_writes_nothing():
    """_solve refuses before it writes: the refitted weight must not land in a layer it then gives up on."""
    from depgraph_llm import build_coupling
    from depgraph_llm.errors import UserError
    from depgraph_llm.planning.plan import PrunePlan
    from depgraph_llm.recovery.reconstruct import reconstruct
    from tests.tiny import tiny_model

    model = tiny_model("llama")  # no biases anywhere (the pipeline would add zero biases first)
    coupling = build_coupling(model)
    plan = PrunePlan("h", "llama", "l2", "uniform", 0, 0.1, 1, 0, 0,
                     keep={f"layers.{i}.mlp.channels": list(range(0, 37, 2)) for i in range(3)})
    before = {n: p.clone() for n, p in model.state_dict().items()}
    batches = [torch.randint(0, 160, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with pytest.raises(UserError, match="has no bias to hold the compensation"):
        reconstruct(model, coupling, plan, batches, "bias", "local")
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_in_process_main_gives_the_signal_handlers_back(source, capsys):
    """A successful command ignores a late Ctrl-C while it returns, but a caller in the same process (a notebook, a
    test runner whose later children inherit an ignored SIGINT) gets its own handlers back."""
    def own(signum, frame) -> None:
        return None

    before_term = signal.getsignal(signal.SIGTERM)
    previous = signal.signal(signal.SIGINT, own)
    try:
        assert cli.main(["graph", str(source)]) == 0
        assert signal.getsignal(signal.SIGINT) is own
        assert signal.getsignal(signal.SIGTERM) is before_term
    finally:
        signal.signal(signal.SIGINT, previous)
