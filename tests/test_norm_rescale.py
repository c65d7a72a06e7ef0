"""Selected hidden channels and the norms over them (removal/norm_rescale.py). Oracle: a model whose residual
stream never uses the channels that are removed (embeddings and every residual writer zero there) computes the
same logits as the dense model once they are sliced away; without the gain rescale it does not."""
import copy
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from depgraph_llm.job.in_memory import prune_in_memory
from depgraph_llm.job.options import PruneOptions
from depgraph_llm.job.replay_plan import run_apply
from tests.test_architectures import tiny_arch

KEEP = 36  # of 48 hidden channels; a multiple of the 4 query heads
BATCHES = [torch.randint(3, 160, (1, 48), generator=torch.Generator().manual_seed(s)) for s in range(4)]
IDS = torch.randint(3, 160, (2, 40), generator=torch.Generator().manual_seed(99))
FAST = dict(seq_len=32, calibration_samples=4, round_to=1, show_progress=False, evaluate=False,
            importance="taylor", reconstruct="none")


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def _confine(model) -> None:
    """Channels KEEP.. carry nothing: zero in the embedding and in the rows of o_proj / down_proj."""
    with torch.no_grad():
        model.get_input_embeddings().weight[:, KEEP:] = 0
        for name, module in model.named_modules():
            if name.endswith(("o_proj", "down_proj")):
                module.weight[KEEP:] = 0


def _hidden_only_options(model) -> PruneOptions:
    config = copy.deepcopy(model.config)
    config.hidden_size = KEEP
    with torch.device("meta"):
        slim = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    ratio = 1 - slim / sum(p.numel() for p in model.parameters())
    options = PruneOptions(ratio=ratio, hidden_ratio=1 - KEEP / 48, mlp_ratio=0.0, head_ratio=0.0, **FAST)
    options.validate()
    return options


@pytest.mark.parametrize("arch", ["llama-gqa", "gemma3"])  # g * x / rms, and Gemma's (1 + g) with post-norms
def test_removing_unused_hidden_channels_keeps_the_dense_logits(arch):
    model = tiny_arch(arch, rms_norm_eps=1e-9)
    _confine(model)
    dense = _logits(model)
    plan, _ = prune_in_memory(model, BATCHES, _hidden_only_options(model))
    assert plan.keep["hidden"] == list(range(KEEP)) and model.config.hidden_size == KEEP
    assert plan.hidden_norm_rescale
    torch.testing.assert_close(_logits(model), dense, atol=1e-3, rtol=1e-3)  # Gemma: 2 of 12800 at 1.1e-4


def test_without_the_rescale_the_same_slice_changes_the_logits():
    """The control: the plan flag off (plans made before it) slices the same channels and the logits move."""
    model = tiny_arch("llama-gqa", rms_norm_eps=1e-9)
    _confine(model)
    dense = _logits(model)
    reference = copy.deepcopy(model)
    plan, _ = prune_in_memory(model, BATCHES, _hidden_only_options(model))
    from depgraph_llm.graph.coupling import build_coupling
    from depgraph_llm.models import spec_for
    from depgraph_llm.removal.apply import apply_plan

    old = copy.deepcopy(plan)
    old.hidden_norm_rescale = False
    apply_plan(reference, build_coupling(reference), old, spec_for("llama"))
    assert (_logits(reference) - dense).abs().max() > 1e-2


def test_apply_replays_the_rescale_and_old_plans_without_it(tmp_path):
    import dataclasses
    import json

    from depgraph_llm.job.prune import run_prune
    from tests.tiny import save_tiny_checkpoint

    source = save_tiny_checkpoint(tmp_path / "dense")
    options = _hidden_only_options(AutoModelForCausalLM.from_pretrained(source))
    pruned = run_prune(dataclasses.replace(options, model=str(source), out=tmp_path / "slim"))
    slim = _logits(AutoModelForCausalLM.from_pretrained(pruned.out).eval())
    replayed = run_apply(pruned.out / "prune_plan.json", str(source), tmp_path / "replayed")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(replayed.out).eval()), slim)
    plan = json.loads((pruned.out / "prune_plan.json").read_text())
    assert plan["hidden_norm_rescale"] is True
    plan["hidden_norm_rescale"] = False  # as a plan made before the field reads
    (tmp_path / "old.json").write_text(json.dumps(plan))
    old = run_apply(tmp_path / "old.json", str(source), tmp_path / "old")
    assert not torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(old.out).eval()), slim, atol=1e-3)


def test_a_layer_norm_keeps_its_gain_and_says_so(caplog):
    from depgraph_llm.graph.coupling import build_coupling
    from depgraph_llm.models import spec_for
    from depgraph_llm.removal.apply import apply_plan
    from tests.test_architectures import plan_for

    model = tiny_arch("gpt-neox")
    coupling = build_coupling(model)
    plan = plan_for(model, coupling, "hidden")
    plan.hidden_norm_rescale = True
    norms = {n: p.clone() for n, p in model.named_parameters() if "layernorm" in n and n.endswith("weight")}
    with caplog.at_level(logging.WARNING):
        apply_plan(model, coupling, plan, spec_for("gpt_neox"))
    assert "not RMSNorm-like" in caplog.text
    kept = torch.tensor(plan.keep["hidden"])
    params = dict(model.named_parameters())
    assert norms and all(torch.equal(params[n], w[kept]) for n, w in norms.items())
