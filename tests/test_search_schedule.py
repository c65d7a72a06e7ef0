"""`--schedule search`: the evolutionary search finds a planted zero-cost profile, holds the budget exactly, records
its profile, saves a uniform result as a stock checkpoint and is reproducible from its seed."""
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from depgraph_llm.checkpoint.loading import load_pruned
from depgraph_llm.errors import UserError
from depgraph_llm.job.options import PruneOptions
from depgraph_llm.job.prune import run_prune
from depgraph_llm.planning.search import Budget, LayerLevels, Profile, SearchSettings, evolve, mutate, params_of
from depgraph_llm.removal.slim_config import is_heterogeneous
from tests.tiny import random_search_scores, tiny_model, tiny_tokenizer

SMALL = dict(seq_len=32, calibration_samples=2, round_to=1, show_progress=False, evaluate=False, reconstruct="none")
IDENTITY_LAYER = 2


def _layer_params(model, layer: int) -> int:
    return sum(p.numel() for p in model.model.layers[layer].parameters())


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """5 layers; layer 2 writes nothing to the residual stream (o_proj and down_proj zero): dropping it is free."""
    model = tiny_model(tie=True, num_hidden_layers=5, intermediate_size=64)
    with torch.no_grad():
        model.model.layers[IDENTITY_LAYER].self_attn.o_proj.weight.zero_()
        model.model.layers[IDENTITY_LAYER].mlp.down_proj.weight.zero_()
    folder = tmp_path_factory.mktemp("planted") / "tiny"
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    total = sum(p.numel() for p in model.parameters())
    return folder, model, _layer_params(model, IDENTITY_LAYER) / total


def _prune(folder, out, **options):
    return run_prune(PruneOptions(model=str(folder), out=out, schedule="search", **{**SMALL, **options}))


def test_search_finds_the_free_layer_drop(planted, tmp_path):
    folder, dense, ratio = planted
    result = _prune(folder, tmp_path / "out", ratio=ratio, search_generations=6, search_layer_drops=True)
    plan = json.loads((tmp_path / "out" / "prune_plan.json").read_text())
    assert plan["removed_layers"] == [IDENTITY_LAYER]
    assert plan["keep"] == {} and plan["keep_nested"] == {}  # every other layer at full width
    assert abs(plan["search"]["best_fitness"]) < 1e-9 < plan["search"]["start_fitness"]
    rows = plan["search"]["profile"]
    assert [row["dropped"] for row in rows] == [i == IDENTITY_LAYER for i in range(5)]
    assert abs(result.report["ratio_achieved"] - ratio) <= 0.01
    # the saved model (a fresh load) computes what the planted dense model computes
    pruned = load_pruned(tmp_path / "out")
    ids = torch.randint(0, 160, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(pruned(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5)


@pytest.fixture(scope="module")
def searched(planted, tmp_path_factory):
    """A search at 0.3 (no free profile at this budget), seed 5."""
    out = tmp_path_factory.mktemp("searched") / "out"
    return _prune(planted[0], out, ratio=0.3, search_generations=4, seed=5), out


def test_searched_budget_is_exact_and_recorded(searched):
    result, out = searched
    plan = json.loads((out / "prune_plan.json").read_text())
    saved = sum(t.numel() for t in _safetensors(out).values())  # counted from the file, not by our counter
    assert saved - dense_tied_share(out) == plan["params_after"] == result.plan.params_after
    assert abs(plan["ratio_achieved"] - 0.3) <= 0.01
    assert plan["schedule"] == "search" and plan["search"]["seed"] == 5
    assert plan["search"]["best_fitness"] <= plan["search"]["start_fitness"]
    widths = result.report["layer_widths_after"]
    recorded = [row for row in plan["search"]["profile"] if not row["dropped"]]
    assert [row["mlp"] for row in recorded] == [row["mlp"] for row in widths]
    assert [row["kv_groups"] * row["q_per_kv"] for row in recorded] == [row["q_heads"] for row in widths]


def _safetensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def dense_tied_share(folder) -> int:
    """Parameters stored twice in the file (a tied LM head saved beside the embeddings), 0 otherwise."""
    tensors = _safetensors(folder)
    config = json.loads((folder / "config.json").read_text())
    if config.get("tie_word_embeddings") and "lm_head.weight" in tensors:
        return tensors["lm_head.weight"].numel()
    return 0


@pytest.mark.slow
def test_same_seed_same_profile(planted, searched, tmp_path):
    first = json.loads((searched[1] / "prune_plan.json").read_text())
    _prune(planted[0], tmp_path / "again", ratio=0.3, search_generations=4, seed=5)
    again = json.loads((tmp_path / "again" / "prune_plan.json").read_text())
    assert first["search"]["profile"] == again["search"]["profile"] and first["search"]["history"]
    assert first["keep"] == again["keep"] and first["removed_layers"] == again["removed_layers"]


@pytest.mark.slow
def test_uniform_result_saves_stock(planted, tmp_path):
    folder, _, _ = planted
    uniform = run_prune(PruneOptions(model=str(folder), out=tmp_path / "uniform", ratio=0.3, **SMALL))
    result = _prune(folder, tmp_path / "out", ratio=0.3, search_generations=0)  # the start: the uniform plan
    plan = json.loads((tmp_path / "out" / "prune_plan.json").read_text())
    assert plan["search"]["uniform"] and plan["keep"] == uniform.plan.keep
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert not is_heterogeneous(config) and "per_layer_config" not in config
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # plain transformers, no remote code
    assert sum(p.numel() for p in stock.parameters()) == result.plan.params_after


def test_search_refuses_what_it_does_not_search(planted, tmp_path):
    folder, _, _ = planted
    with pytest.raises(UserError, match="hidden"):
        _prune(folder, tmp_path / "out", ratio=0.3, hidden_ratio=0.25)
    with pytest.raises(UserError, match="search-generations"):
        _prune(folder, tmp_path / "out2", ratio=0.3, search_generations=-1)


def _levels(count: int) -> list[LayerLevels]:
    """Layers with MLP widths 1..8 (100 parameters a channel) and two attention levels (0 / 500 removed)."""
    return [LayerLevels(layer=i, mlp=tuple(range(1, 9)), mlp_saving=tuple(100 * (8 - w) for w in range(1, 9)),
                        heads=((1, 1), (2, 1)), head_saving=(500, 0), drop_saving=1500) for i in range(count)]


def test_mutations_stay_in_the_band():
    levels = _levels(6)
    full = 6 * 1500 + 1000
    budget = Budget(full=full, low=full - 2300, high=full - 2000)
    start = Profile(mlp=(3,) * 4 + (7, 7), heads=(0,) + (1,) * 5, dropped=(False,) * 6)
    assert budget.holds(params_of(start, levels, full))
    rng = random.Random(0)
    settings = SearchSettings(drop_chance=0.3)  # layer drops on
    children = [mutate(start, levels, budget, settings, rng) for _ in range(200)]
    assert all(c is None or budget.holds(params_of(c, levels, full)) for c in children)
    assert any(c is not None and any(c.dropped) for c in children)


def test_evolution_reaches_the_known_optimum():
    """Fitness = the squared distance of the MLP widths from a target profile; evolution must reach it."""
    levels = _levels(4)
    full = 4 * 1500 + 1000
    target = (7, 0, 7, 7)  # widths 8, 1, 8, 8: 700 parameters removed, all in layer 1
    budget = Budget(full=full, low=full - 700, high=full - 700)
    start = Profile(mlp=(5, 5, 5, 6), heads=(1,) * 4, dropped=(False,) * 4)
    assert params_of(start, levels, full) == full - 700

    def fitness(profile, windows):
        return float(sum((a - b) ** 2 for a, b in zip(profile.mlp, target)) + 10 * any(profile.dropped)
                     + 10 * (profile.heads != (1,) * 4))

    result = evolve(start, levels, budget, fitness, SearchSettings(generations=60, drop_chance=0.0), seed=0)
    assert result.profile.mlp == target and result.fitness == 0.0 < result.start_fitness


def test_time_limit_stops_between_generations():
    """A clock that advances one second per fitness call: with a 30 s limit the generations that start after 30 s
    are not run (counted by hand from the calls each generation makes), and the record says why it stopped."""
    levels = _levels(4)
    full = 4 * 1500 + 1000
    budget = Budget(full=full, low=full - 700, high=full - 700)
    start = Profile(mlp=(5, 5, 5, 6), heads=(1,) * 4, dropped=(False,) * 4)
    now = [0.0]
    calls = []

    def fitness(profile, windows):
        now[0] += 1.0
        calls.append(now[0])
        return float(sum(profile.mlp))

    settings = SearchSettings(generations=50, offspring=4, survivors=1, time_limit_s=30.0)
    result = evolve(start, levels, budget, fitness, settings, seed=0, clock=lambda: now[0])
    assert result.stopped_by == "time limit"
    per_generation = settings.offspring + settings.survivors  # calls when every generation fills its offspring
    assert result.evaluations == len(calls)
    expected = -(-(30 - 1) // per_generation)  # generations started while fewer than 30 calls had been made
    assert len(result.history) == expected < settings.generations
    assert now[0] >= 30.0 and now[0] - per_generation < 30.0
    unlimited = evolve(start, levels, budget, fitness, SearchSettings(generations=7, time_limit_s=None), seed=0,
                       clock=lambda: now[0])
    assert unlimited.stopped_by == "generations" and len(unlimited.history) == 7


def test_masked_candidate_computes_what_the_pruned_model_computes():
    """The fitness masks units and skips layers; the physically pruned model (removal/apply.py) must agree."""
    import copy

    from depgraph_llm.models import spec_for
    from depgraph_llm.job.in_memory import couple_or_explain
    from depgraph_llm.planning.budget import Allocation, ParamCounter
    from depgraph_llm.planning.fitness import ProfileScorer
    from depgraph_llm.planning.plan import PrunePlan
    from depgraph_llm.planning.search_levels import level_database, profile_keep, searched_layers
    from depgraph_llm.removal.apply import apply_plan

    model = tiny_model(num_hidden_layers=4, intermediate_size=40)
    coupling = couple_or_explain(model)
    counter = ParamCounter({n: tuple(p.shape) for n, p in model.named_parameters()}, coupling)
    layers = searched_layers(coupling)
    levels = level_database(layers, counter, 1, Allocation(), lambda widths: True)
    scores = random_search_scores(layers, seed=3)
    heads = [lv.heads.index(level) for lv, level in zip(levels, [(1, 2), (2, 2), (2, 1), (1, 1)])]
    profile = Profile(mlp=(4, 39, 19, 30), heads=tuple(heads), dropped=(False, True, False, False))
    ids = torch.randint(0, 160, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with ProfileScorer(model, coupling, layers, levels, scores, [ids]) as scorer:
            scorer.set_profile(profile)
            masked = model(input_ids=ids).logits
            assert scorer(profile) > 0 and scorer(dense_profile(profile, levels)) == pytest.approx(0, abs=1e-7)
        assert torch.equal(model(input_ids=ids).logits, dense)  # hooks gone
    keep, keep_nested, removed = profile_keep(layers, levels, profile, scores)
    full = counter.count({})
    plan = PrunePlan(model_hash="", model_type="llama", estimator="random", schedule="search", seed=0,
                     ratio_requested=0.5, round_to=1, params_before=full,
                     params_after=params_of(profile, levels, full), keep=keep, keep_nested=keep_nested,
                     removed_layers=removed)
    pruned = apply_plan(copy.deepcopy(model), coupling, plan, spec_for("llama"))
    assert sum(p.numel() for p in pruned.parameters()) == plan.params_after
    with torch.no_grad():
        assert torch.allclose(pruned(input_ids=ids).logits, masked, atol=1e-5)


def dense_profile(profile: Profile, levels: list[LayerLevels]) -> Profile:
    """The dense profile: every layer kept at its widest levels."""
    return Profile(mlp=tuple(len(lv.mlp) - 1 for lv in levels), heads=tuple(len(lv.heads) - 1 for lv in levels),
                   dropped=(False,) * len(levels))
