"""The layer pipeline: the ported passes (OBS statistics, activation statistics, depth metrics, reconstruction)
give byte-identical plans and weights to the hand-written passes they replaced (fingerprints saved from the old
code in tests/data/layer_pipeline_oracle.json)."""
import json

import pytest

from tests.layer_oracle import CASES, ORACLE, prune_case, run_case


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_port_is_byte_identical_to_the_old_passes(name, monkeypatch):
    """With the two reconstruction changes made after the port switched off (head OBS for query heads nested in
    KV groups, and the exact sequential mode's second statistics pass), everything else is as it was."""
    from depgraph_llm.recovery import reconstruct

    monkeypatch.setattr(reconstruct, "_nested_heads", lambda owners: None)
    monkeypatch.setattr(reconstruct.Reconstruction, "restat", lambda self, step, consumers: None)
    expected = json.loads(ORACLE.read_text())[name]
    assert run_case(name, prune_case) == expected


def _full_forward_statistics(model, batches):
    """The reference: hooks on every nn.Linear and one whole-model forward per batch (the old pass)."""
    import torch
    from torch import nn

    stats, hooks = {}, []

    def make_hook(name):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            entry = stats.setdefault(name, {"sum": 0, "sumsq": 0, "tokens": 0})
            entry["sum"] = entry["sum"] + x.sum(0)
            entry["sumsq"] = entry["sumsq"] + (x * x).sum(0)
            entry["tokens"] += len(x)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(make_hook(f"{name}.weight")))
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    return stats


def _all_architectures():
    from tests.test_architectures import ARCHITECTURES, MORE_ARCHITECTURES

    return sorted({*ARCHITECTURES, *MORE_ARCHITECTURES})


@pytest.mark.parametrize("arch", _all_architectures())
def test_layer_pipeline_statistics_equal_a_whole_model_forward(arch):
    """Stub layers capture each layer's arguments (masks, rotary tables, sliding windows, Falcon's tuple outputs),
    the layers run one at a time and a replayed tail reaches the head: every linear layer sees bit for bit the
    inputs of a whole-model forward, on every architecture of the conformance matrix."""
    import torch

    from depgraph_llm.importance.activations import input_statistics
    from tests.test_architectures import tiny_arch

    model = tiny_arch(arch)
    batches = [torch.randint(3, 160, (1, 13), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    expected = _full_forward_statistics(model, batches)
    actual = input_statistics(model, batches)
    assert sorted(actual) == sorted(expected)
    for name, entry in expected.items():
        assert actual[name]["tokens"] == entry["tokens"], name
        assert torch.equal(actual[name]["sum"], entry["sum"]) and torch.equal(actual[name]["sumsq"], entry["sumsq"]), name
