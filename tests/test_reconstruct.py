"""Retrain-free reconstruction: solvers against references, exactness where the answer is reachable, the
layer pipeline's bounded memory, and the CLI."""
import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from depgraph_llm.removal.apply import apply_plan
from depgraph_llm.graph.coupling import build_coupling
from depgraph_llm.planning.plan import PrunePlan
from depgraph_llm.models import spec_for
from depgraph_llm.recovery.reconstruct import reconstruct
from depgraph_llm.recovery.solvers import (anchored_least_squares, bias_correction, kept_block, least_squares,
                                            obs_select, ridge, solve_damped)
from tests.cli_helpers import FAST, one_line_error, run_cli, run_prune
from tests.tiny import save_tiny_checkpoint, tiny_model

DAMP = 1e-9


def _stats(tokens: int = 40, width: int = 6, out: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=generator, dtype=torch.float64)
    w = torch.randn(out, width, generator=generator, dtype=torch.float64)
    return x, w, x.T @ x


def _error(x, w, gram, kept: list[int], damp: float) -> float:
    """Brute force: re-solve the ridge least squares on the kept columns and measure the objective."""
    kept_t = torch.tensor(kept, dtype=torch.long)
    fit = least_squares(gram, gram @ w.T, kept_t, damp)
    return float(((x[:, kept_t] @ fit.T - x @ w.T) ** 2).sum() + ridge(gram, damp) * (fit ** 2).sum())


def test_least_squares_recovers_reachable_outputs_exactly():
    x, w, _ = _stats()
    x[:, 4] = x[:, 0] - 2 * x[:, 1]  # columns 4 and 5 are combinations of the others
    x[:, 5] = 0.5 * x[:, 2] + x[:, 3]
    gram = x.T @ x
    kept = torch.tensor([0, 1, 2, 3])
    fit = least_squares(gram, gram @ w.T, kept, DAMP)
    naive = x[:, kept] @ w[:, kept].T
    assert (naive - x @ w.T).abs().max() > 0.1
    assert torch.allclose(x[:, kept] @ fit.T, x @ w.T, atol=1e-6)


@pytest.mark.parametrize("unit_width", [1, 2])
def test_obs_matches_brute_force_greedy(unit_width):
    x, w, gram = _stats(width=8, seed=unit_width)
    damp = 0.01
    units = [torch.arange(u * unit_width, (u + 1) * unit_width) for u in range(8 // unit_width)]
    remove = 3 if unit_width == 1 else 2
    chosen = obs_select(w, gram, units, remove, damp, steps=None)
    alive: list[int] = list(range(len(units)))
    reference = []
    for _ in range(remove):
        def cost(u):
            kept = [c for v in alive if v != u for c in units[v].tolist()]
            return _error(x, w, gram, kept, damp)
        best = min(alive, key=cost)
        reference.append(best)
        alive.remove(best)
    assert chosen == reference
    # one removal: greedy OBS is the exhaustive optimum
    first = obs_select(w, gram, units, 1, damp, steps=None)[0]
    exhaustive = min(range(len(units)), key=lambda u: _error(
        x, w, gram, [c for v in range(len(units)) if v != u for c in units[v].tolist()], damp))
    assert first == exhaustive


def test_obs_removes_redundant_columns_first():
    x, w, _ = _stats(width=6)
    x[:, 5] = x[:, 1]  # an exact duplicate: removing it costs nothing once its weight moves to column 1
    removed = obs_select(w, x.T @ x, [torch.tensor([i]) for i in range(6)], 1, DAMP)
    assert removed in ([1], [5])


def test_bias_correction_restores_the_mean_output():
    x, w, _ = _stats()
    b = torch.randn(4, dtype=torch.float64)
    kept = torch.tensor([0, 2, 3])
    mean_x, mean_y = x.mean(0), (x @ w.T + b).mean(0)
    new_b = bias_correction(mean_x, mean_y, w, kept)
    assert torch.allclose((x[:, kept] @ w[:, kept].T + new_b).mean(0), mean_y)
    assert torch.allclose(new_b, b + w[:, [1, 4, 5]] @ mean_x[[1, 4, 5]])  # FLAP's formula


def _redundant_model():
    """Tiny Llama where MLP channel 5 duplicates channel 3 and query head 1 (3) duplicates head 0 (2) in its KV
    group, in every layer: removing the duplicates is exactly reachable by reconstruction."""
    model = tiny_model()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
                proj.weight[5] = proj.weight[3]
            q = layer.self_attn.q_proj.weight.view(4, 12, -1)
            q[1], q[3] = q[0], q[2]
    return model


def _plan(model, coupling, drop_channel: int | None):
    keep, keep_nested = {}, {}
    for group in coupling.groups:
        if group.kind.value == "channels" and drop_channel is not None:
            keep[group.name] = [i for i in range(group.size) if i != drop_channel]
        if group.nested is not None:
            keep_nested[group.nested.name] = [[0]] * group.size
    params = sum(p.numel() for p in model.parameters())
    return PrunePlan("", "llama", "test", "uniform", 0, 0.1, 1, params, params, keep=keep, keep_nested=keep_nested)


@pytest.mark.parametrize("mode", ["local", "sequential"])
@pytest.mark.parametrize("method", ["ls", "obs"])
def test_reconstruction_is_exact_when_reachable(method, mode):
    model = _redundant_model()
    batches = [torch.randint(0, 160, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    test_ids = torch.randint(0, 160, (2, 17), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        dense = model(input_ids=test_ids).logits
    coupling = build_coupling(model)
    # ls is told to drop the duplicate; obs is told to drop one channel and must find a duplicate itself
    plan = _plan(model, coupling, drop_channel=5 if method == "ls" else 0)
    naive = _redundant_model()
    apply_plan(naive, coupling, _plan(naive, coupling, 5), spec_for("llama"))
    report = reconstruct(model, coupling, plan, batches, method, mode, damp=DAMP)
    apply_plan(model, coupling, plan, spec_for("llama"))
    with torch.no_grad():
        naive_gap = (naive(input_ids=test_ids).logits - dense).abs().max()
        gap = (model(input_ids=test_ids).logits - dense).abs().max()
    assert naive_gap > 1e-2 and gap < 1e-3, (naive_gap, gap)
    assert report.layers == 3 and report.consumers == 6 and report.relative_error_after < 1e-3
    if method == "obs":
        assert all(set(plan.keep[g]) in ({0, 1, 2, 3, 4} | set(range(6, 37)), set(range(37)) - {3})
                   for g in plan.keep)


MEMORY_PROBE = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from transformers import AutoConfig, AutoModelForCausalLM
    from depgraph_llm.graph.coupling import build_coupling
    from depgraph_llm.planning.plan import PrunePlan
    from depgraph_llm.recovery.reconstruct import reconstruct
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=1536, num_attention_heads=4,
                                  num_key_value_heads=2, num_hidden_layers=int(sys.argv[1]), vocab_size=64)
    model = AutoModelForCausalLM.from_config(config).eval()
    coupling = build_coupling(model)
    keep = {g.name: list(range(0, g.size, 2)) for g in coupling.groups if g.kind.value == "channels"}
    plan = PrunePlan("", "llama", "t", "uniform", 0, 0.1, 1, 1, 1, keep=keep)
    batches = [torch.randint(0, 64, (1, 256)) for _ in range(4)]
    def rss(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS high-water mark
    start = rss("VmRSS:")
    reconstruct(model, coupling, plan, batches, "ls", "sequential")
    print(rss("VmHWM:") - start)
""")


@pytest.mark.slow  # ~26 s: several prunes measured in subprocesses
def test_pipeline_peak_memory_does_not_grow_with_depth():
    """Each down_proj's float64 Gram is 1536^2 * 8 B = 18.9 MB: holding every layer's at once (what a
    whole-model hook pass does) would add that per layer; the layer pipeline holds one layer's."""
    # a fixed mmap threshold makes glibc hand large freed blocks back at once, so RSS tracks live memory
    # rather than what the allocator chose to keep
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}

    def peak(layers: int) -> int:
        result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(layers)], capture_output=True, text=True,
                                timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        return int(result.stdout.strip().splitlines()[-1])

    per_layer_gram = 1536 ** 2 * 8
    shallow, deep = peak(2), peak(10)
    assert shallow > per_layer_gram  # the probe measures what it claims to
    assert deep - shallow < 2 * per_layer_gram, (shallow, deep)


def test_prune_with_reconstruction_and_replay(tiny_checkpoint, tmp_path):
    out = tmp_path / "ls"
    result = run_prune("--model", str(tiny_checkpoint), "--ratio", "0.3", "--out", str(out), "--reconstruct", "ls",
                       *FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads((out / "prune_plan.json").read_text())
    assert plan["reconstruct"] == "ls" and plan["reconstruct_mode"] == "sequential"
    assert abs(plan["ratio_achieved"] - 0.3) <= 0.01 and plan["reconstruct_report"]["layers"] == 3
    report = json.loads((out / "prune_report.json").read_text())
    assert "reconstruct" in report["timings_s"]
    replay = run_cli("apply", str(out / "prune_plan.json"), "--model", str(tiny_checkpoint),
                     "--out", str(tmp_path / "replay"))  # replayed exactly: tests/test_replay.py
    assert replay.returncode == 0, replay.stderr[-2000:]


def test_bias_reconstruction_saves_a_stock_checkpoint(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bias"
    result = run_prune("--model", str(tiny_checkpoint), "--ratio", "0.3", "--out", str(out), "--reconstruct", "bias",
                       "--calibration", "self", *FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads((out / "prune_plan.json").read_text())
    source = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_checkpoint).parameters())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.attention_bias and model.config.mlp_bias
    assert plan["params_before"] == source and sum(p.numel() for p in model.parameters()) == plan["params_after"]
    assert abs(1 - plan["params_after"] / source - 0.3) <= 0.01
    assert any(float(m.mlp.down_proj.bias.detach().abs().max()) > 0 for m in model.model.layers)
    assert json.loads((out / "prune_report.json").read_text())["calibration"]["files"] == ["self"]


def test_bias_reconstruction_refused_where_the_config_cannot_hold_a_bias(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "mistral", "mistral")
    line = one_line_error(run_prune("--model", str(checkpoint), "--ratio", "0.3", "--out", str(tmp_path / "o"),
                                    "--reconstruct", "bias", *FAST))
    assert "cannot store a bias" in line and "--reconstruct ls" in line and not (tmp_path / "o").exists()


def test_self_generated_calibration_is_seeded_and_from_the_model():
    from depgraph_llm.calibration.sources import self_generated_windows
    from tests.tiny import tiny_tokenizer

    model, tokenizer = tiny_model(), tiny_tokenizer()
    first = self_generated_windows(model, tokenizer, 16, 3, seed=1)
    again = self_generated_windows(model, tokenizer, 16, 3, seed=1)
    other = self_generated_windows(model, tokenizer, 16, 3, seed=2)
    assert [w.shape for w in first] == [(1, 16)] * 3
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    special = set(tokenizer.all_special_ids)
    assert not any(int(t) in special for w in first for t in w[0])
    # sampled from the model: its own likelihood of the text beats that of uniformly random tokens
    random_ids = torch.randint(0, 160, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = model(input_ids=torch.cat(first), labels=torch.cat(first)).loss
        rand = model(input_ids=random_ids, labels=random_ids).loss
    assert own < rand


def _duplicate_mlp_channel(model, arch: str) -> None:
    """MLP channel 5 := channel 3 in every layer, through GPT-2's transposed Conv1D or Phi-3's fused gate_up."""
    with torch.no_grad():
        for layer in (model.transformer.h if arch == "gpt2" else model.model.layers):
            if arch == "gpt2":
                layer.mlp.c_fc.weight[:, 5] = layer.mlp.c_fc.weight[:, 3]
                layer.mlp.c_fc.bias[5] = layer.mlp.c_fc.bias[3]
            else:
                width = layer.mlp.gate_up_proj.weight.shape[0] // 2
                for offset in (0, width):
                    layer.mlp.gate_up_proj.weight[offset + 5] = layer.mlp.gate_up_proj.weight[offset + 3]


@pytest.mark.parametrize("arch", ["gpt2", "phi3"])
def test_reconstruction_reaches_conv1d_and_fused_projections(arch):
    """Dropping a duplicated MLP channel is exactly recoverable; least squares must find that on GPT-2 (Conv1D
    consumers, weight stored transposed) and Phi-3 (the channel lives in two segments of gate_up_proj)."""
    from tests.test_architectures import ARCHITECTURES, tiny_arch

    model = tiny_arch(arch)
    _duplicate_mlp_channel(model, arch)
    test_ids = torch.randint(3, 160, (2, 17), generator=torch.Generator().manual_seed(99))
    batches = [torch.randint(3, 160, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        dense = model(input_ids=test_ids).logits
    coupling = build_coupling(model)
    keep = {g.name: [i for i in range(g.size) if i != 5] for g in coupling.groups if g.kind.value == "channels"}
    params = sum(p.numel() for p in model.parameters())
    plan = PrunePlan("", arch, "test", "uniform", 0, 0.1, 1, params, params, keep=keep)
    naive = copy.deepcopy(model)
    apply_plan(naive, coupling, copy.deepcopy(plan), spec_for(ARCHITECTURES[arch][0]))
    report = reconstruct(model, coupling, plan, batches, "ls", "local", damp=DAMP)
    apply_plan(model, coupling, plan, spec_for(ARCHITECTURES[arch][0]))
    with torch.no_grad():
        naive_gap = (naive(input_ids=test_ids).logits - dense).abs().max()
        gap = (model(input_ids=test_ids).logits - dense).abs().max()
    assert report.consumers == 3 and naive_gap > 1e-3 and gap < 1e-4, (naive_gap, gap)


def test_anchored_refit_is_the_regularised_least_squares():
    """Oracle: the same objective written as one augmented least-squares problem, solved by lstsq."""
    x, w, gram = _stats(tokens=30, width=6, out=4, seed=3)
    kept = torch.tensor([0, 2, 3, 5])
    anchor, ridge_value = 0.7, 1e-3
    gram_kept = kept_block(gram, kept)
    before = gram_kept.clone()
    fit = anchored_least_squares(gram_kept, (gram @ w.T)[kept], w[:, kept], ridge_value, anchor)
    assert torch.equal(gram_kept, before)  # damped in place, restored
    pull = (anchor * gram.diagonal()[kept] + ridge_value).sqrt()  # every damping term pulls toward w
    a = torch.cat([x[:, kept], torch.diag(pull)])
    b = torch.cat([x @ w.T, pull[:, None] * w[:, kept].T])
    oracle = torch.linalg.lstsq(a, b).solution.T
    assert torch.allclose(fit, oracle, atol=1e-10)
    plain = anchored_least_squares(gram_kept, (gram @ w.T)[kept], w[:, kept], ridge_value, 0.0)
    assert torch.equal(plain, solve_damped(gram_kept, (gram @ w.T)[kept], ridge_value))
    assert (plain - fit).abs().max() > 1e-2  # the anchor changes the answer
    held = anchored_least_squares(gram_kept, (gram @ w.T)[kept], w[:, kept], ridge_value, 1e9)
    assert torch.allclose(held, w[:, kept], atol=1e-6)  # a strong anchor keeps the original weights


def test_anchor_is_recorded_and_moves_the_refit(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file
    from depgraph_llm.job.options import PruneOptions
    from depgraph_llm.job.prune import run_prune as prune_in_process

    weights = {}
    for anchor in (0.0, 0.5):
        out = tmp_path / f"anchor-{anchor}"
        prune_in_process(PruneOptions(model=str(tiny_checkpoint), out=out, ratio=0.3, seq_len=32, calibration_samples=4,
                                      round_to=1, show_progress=False, evaluate=False, reconstruct="ls",
                                      reconstruct_anchor=anchor))
        assert json.loads((out / "prune_plan.json").read_text())["reconstruct_anchor"] == anchor
        weights[anchor] = load_file(out / "model.safetensors")
    plain, anchored = weights[0.0], weights[0.5]
    assert any(not torch.equal(anchored[n], plain[n]) for n in plain if n.endswith("down_proj.weight"))
    assert all(torch.equal(anchored[n], plain[n]) for n in plain if n.endswith(("up_proj.weight", "gate_proj.weight")))


def test_negative_anchor_is_a_one_line_error(tiny_checkpoint, tmp_path):
    result = run_prune("--model", str(tiny_checkpoint), "--out", str(tmp_path / "o"), "--ratio", "0.3",
                       "--reconstruct-anchor", "-1", *FAST)
    assert "--reconstruct-anchor" in one_line_error(result)
    assert not (tmp_path / "o").exists()
