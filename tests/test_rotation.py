"""Hidden pruning by rotation (--hidden-method rotate, recovery/rotation.py): the full-width rotation is an exact
change of basis; a residual stream confined to r directions by construction is sliced to r without changing the
logits; the saved folder loads with plain from_pretrained in a fresh process; the budget holds exactly."""
import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from depgraph_llm.errors import UserError
from depgraph_llm.graph.coupling import build_coupling
from depgraph_llm.layers import InMemorySource, LayerPipeline
from depgraph_llm.job.options import PruneOptions
from depgraph_llm.job.in_memory import prune_in_memory
from depgraph_llm.job.replay_plan import run_apply
from depgraph_llm.job.output import save_checkpoint
from depgraph_llm.recovery.rotation import (ResidualPCA, fold_norms, pca_basis, residual_roles, rotate_and_slice,
                                            sliced_norm, untie_head)
from tests.cli_helpers import FAST as FAST_CLI, run_prune as run_prune_cli
from tests.tiny import LICENSES, save_tiny_checkpoint, tiny_model, tiny_tokenizer

BATCHES = [torch.randint(3, 160, (1, 48), generator=torch.Generator().manual_seed(s)) for s in range(4)]
IDS = torch.randint(3, 160, (2, 40), generator=torch.Generator().manual_seed(99))
FAST = dict(seq_len=32, calibration_samples=4, round_to=1, show_progress=False, evaluate=False, importance="l2")


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def _stock_params(config) -> int:
    """Parameters of a stock model built from a config (on meta): an oracle independent of the planner."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


# ---- the math ------------------------------------------------------------------------------------------------------

def test_pca_basis_is_orthogonal_sorted_and_finds_the_principal_axes():
    rotation = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0]
    gram = rotation @ torch.diag(torch.tensor([1.0, 9.0, 0.01], dtype=torch.float64)) @ rotation.T
    q, values = pca_basis(gram)
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(values, torch.tensor([9.0, 1.0, 0.01], dtype=torch.float64))
    overlap = (q.T @ rotation).abs()  # q's columns are rotation's, reordered by eigenvalue (up to sign)
    torch.testing.assert_close(overlap, torch.tensor([[0, 1.0, 0], [1.0, 0, 0], [0, 0, 1.0]], dtype=torch.float64))


def test_sliced_norm_matches_the_full_width_norm_on_a_confined_stream():
    eps, width, keep = 0.3, 8, 3
    x = torch.zeros(5, width, dtype=torch.float64)
    x[:, :keep] = torch.randn(5, keep, dtype=torch.float64)
    full = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    scale, new_eps = sliced_norm(eps, width, keep)
    small = x[:, :keep]
    torch.testing.assert_close(scale * small * torch.rsqrt(small.pow(2).mean(-1, keepdim=True) + new_eps),
                               full[:, :keep])


# ---- (a) computational invariance ----------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True])
def test_full_width_rotation_reproduces_the_dense_logits(tie):
    model = tiny_model(tie=tie)
    dense = _logits(model)
    untie_head(model)
    coupling = build_coupling(model)
    roles = residual_roles(model, coupling, BATCHES[0][:, :16])
    assert sorted(roles.norms) == sorted([f"model.layers.{i}.{n}" for i in range(3)
                                          for n in ("input_layernorm", "post_attention_layernorm")] + ["model.norm"])
    assert roles.norms["model.norm"] == ["lm_head.weight"]
    fold_norms(model, roles)
    pca = ResidualPCA()
    LayerPipeline(InMemorySource(model, coupling.layers_path), [pca]).run(BATCHES)
    q, _ = pca_basis(pca.gram)
    rotate_and_slice(model, roles, q, roles.width)
    assert not torch.allclose(model.model.embed_tokens.weight, tiny_model(tie=tie).model.embed_tokens.weight)
    torch.testing.assert_close(_logits(model), dense, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["opt", "gemma3_text"])  # LayerNorm (centering, bias); Gemma's 1 + g
def test_norms_that_do_not_commute_with_rotation_are_refused(model_type):
    model = tiny_model(model_type)
    coupling = build_coupling(model)
    with pytest.raises(UserError, match="not an RMSNorm"):
        residual_roles(model, coupling, BATCHES[0][:, :16])


# ---- (b) rank-deficient residual stream ----------------------------------------------------------------------------

def _confine(model, rank: int, seed: int = 0) -> None:
    """Embeddings and every residual writer (o_proj, down_proj) projected onto one random rank-r subspace."""
    basis = torch.linalg.qr(torch.randn(model.config.hidden_size, rank, generator=torch.Generator().manual_seed(seed)))[0]
    projector = basis @ basis.T
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ projector)
        for layer in model.model.layers:
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                linear.weight.copy_(projector @ linear.weight)


def _hidden_only_ratio(model, keep: int) -> float:
    """The ratio that slicing the hidden size to `keep` alone removes (head untied), from stock configs."""
    config = copy.deepcopy(model.config)
    config.hidden_size, config.tie_word_embeddings = keep, False
    return 1 - _stock_params(config) / sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("tie", [False, True])
def test_rank_deficient_stream_sliced_to_its_rank_reproduces_the_dense_logits(tie):
    rank = 36  # a multiple of the 4 query heads, as --hidden-ratio rounds to
    model = tiny_model(tie=tie, rms_norm_eps=0.1)  # a large epsilon: the sliced norm's eps * d / k must be right
    _confine(model, rank)
    dense = _logits(model)
    options = PruneOptions(ratio=_hidden_only_ratio(model, rank), hidden_ratio=1 - rank / 48, mlp_ratio=0.0,
                           head_ratio=0.0, hidden_method="rotate", reconstruct="none", **FAST)
    options.validate()
    plan, _ = prune_in_memory(model, BATCHES, options)
    assert model.config.hidden_size == rank and model.model.embed_tokens.weight.shape == (160, rank)
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (37, rank)  # nothing but the hidden size was cut
    assert plan.rotation_report["explained"] == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(_logits(model), dense, atol=1e-4, rtol=1e-4)


def test_a_full_rank_stream_sliced_the_same_way_does_change_the_logits():
    model = tiny_model(rms_norm_eps=0.1)  # the control for the test above: slicing is not free in general
    dense = _logits(model)
    options = PruneOptions(ratio=_hidden_only_ratio(model, 36), hidden_ratio=0.25, mlp_ratio=0.0, head_ratio=0.0,
                           hidden_method="rotate", reconstruct="none", **FAST)
    prune_in_memory(model, BATCHES, options)
    assert (_logits(model) - dense).abs().max() > 1e-2


# ---- reconstruction follows the rotated stream ---------------------------------------------------------------------

def test_reconstruction_refits_only_the_mlp_outputs_after_rotation():
    model = tiny_model(tie=True)
    options = PruneOptions(ratio=0.3, hidden_ratio=0.25, head_ratio=0.0, hidden_method="rotate", reconstruct="ls",
                           **FAST)
    options.validate()
    plan, _ = prune_in_memory(model, BATCHES, options)
    assert plan.reconstruct_report["consumers"] == 3  # one down_proj per layer: the hidden readers keep their weights
    assert plan.reconstruct_report["relative_error_after"] < plan.reconstruct_report["relative_error_before"]


# ---- (c) stock checkpoint, fresh process; (d) exact budget ---------------------------------------------------------

def test_saved_rotated_model_loads_stock_in_a_fresh_process_with_the_same_logits(tmp_path):
    model = tiny_model(tie=True, rms_norm_eps=0.1)  # a large epsilon: the saved config must carry eps * d / k
    options = PruneOptions(ratio=0.3, hidden_ratio=0.25, hidden_method="rotate", reconstruct="ls", **FAST)
    plan, _ = prune_in_memory(model, BATCHES, options)
    expected = _logits(model)
    out = tmp_path / "rotated"
    save_checkpoint(model, tiny_tokenizer(), out, plan, {}, overwrite=False)
    torch.save(IDS, tmp_path / "ids.pt")
    script = ("import sys, torch; from transformers import AutoModelForCausalLM; "
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); "
              "ids = torch.load(sys.argv[2]); torch.save(m(input_ids=ids, use_cache=False).logits, sys.argv[3])")
    subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
                   check=True, capture_output=True, timeout=300)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["hidden_size"] == 36
    assert config["tie_word_embeddings"] is False and "auto_map" not in config
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5, rtol=1e-5)


def test_prune_py_with_rotation_holds_the_budget_exactly(tmp_path):
    source = save_tiny_checkpoint(tmp_path / "src", tie=True)
    out = tmp_path / "out"
    result = run_prune_cli("--model", str(source), "--ratio", "0.3", "--hidden-ratio", "0.25", "--hidden-method",
                           "rotate", "--importance", "l2", "--calibration", str(LICENSES / "GPL-3"), "--out", str(out),
                           "--no-eval", *FAST_CLI)
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads((out / "prune_plan.json").read_text())
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # counted from the file, not by the planner
        saved = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    with safe_open(str(source / "model.safetensors"), "pt") as f:
        before = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    assert saved == plan["params_after"] == _stock_params(AutoConfig.from_pretrained(out))
    assert plan["params_before"] == before  # the untied head is counted in the budget, not in the reference
    assert abs(1 - saved / before - 0.3) <= 0.01
    assert plan["hidden_method"] == "rotate" and plan["reconstruct"] == "obs" and plan["chosen_by"]["hidden"]
    report = json.loads((out / "prune_report.json").read_text())
    assert report["rotation_report"]["head_untied"] is True and report["rotation_report"]["kept"] == 36
    with pytest.raises(UserError, match="rerun `prune`"):
        run_apply(out / "prune_plan.json", str(source), tmp_path / "replay")


def test_rotate_without_hidden_ratio_is_refused():
    with pytest.raises(UserError, match="add --hidden-ratio"):
        PruneOptions(hidden_method="rotate").validate()
    with pytest.raises(UserError, match="--hidden-method rotate"):
        PruneOptions(hidden_ratio=0.2, reconstruct="obs").validate()
