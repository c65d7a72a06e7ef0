"""Depth pruning: layer scores from hidden states, layer choice, the depth schedule end to end."""
import json

import torch
from transformers import AutoModelForCausalLM

from depgraph_llm import build_coupling
from depgraph_llm.importance.depth import angular_distance, block_influence
from depgraph_llm.planning.budget import ParamCounter, plan_depth
from tests.cli_helpers import FAST, run_prune
from tests.tiny import tiny_model

BATCHES = [torch.randint(0, 160, (1, 12), generator=torch.Generator().manual_seed(s)) for s in range(2)]


def identity_layer(model, index):
    """Zero the layer's output projections: it then returns its input unchanged."""
    layer = model.model.layers[index]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def test_block_influence_and_angular_find_the_identity_layer():
    model = tiny_model("llama", num_hidden_layers=4)
    identity_layer(model, 2)
    influence = block_influence(model, model.model.layers, BATCHES)
    assert influence[2].item() < 1e-6 and influence[[0, 1, 3]].min().item() > 1e-3
    distances = angular_distance(model, model.model.layers, BATCHES, span=1)
    assert len(distances) == 4 and int(distances.argmin()) == 2 and distances[2].item() < 1e-3
    assert len(angular_distance(model, model.model.layers, BATCHES, span=3)) == 2


def test_plan_depth_takes_lowest_scores_within_budget():
    model = tiny_model("llama", num_hidden_layers=4)
    coupling = build_coupling(model)
    counter = ParamCounter({n: tuple(p.shape) for n, p in model.named_parameters()}, coupling)
    total = counter.count({})
    per_layer = total - counter.count({}, removed_layers=frozenset({0}))
    scores = torch.tensor([0.5, 0.1, 0.9, 0.2])
    removed = plan_depth(counter, scores, ratio=2 * per_layer / total)
    assert removed == [1, 3]


def test_depth_schedule_end_to_end(tiny_checkpoint, tmp_path):
    out = tmp_path / "deep"
    result = run_prune("--model", str(tiny_checkpoint), "--ratio", "0.3", "--out", str(out), "--schedule", "depth",
                       *FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads((out / "prune_plan.json").read_text())
    assert plan["schedule"] == "depth-bi" and len(plan["removed_layers"]) >= 1
    assert abs(plan["ratio_achieved"] - 0.3) <= 0.01
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 3 - len(plan["removed_layers"]) == len(model.model.layers)
    assert sum(p.numel() for p in model.parameters()) == plan["params_after"]
