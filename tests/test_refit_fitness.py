"""`--search-fitness refit`: a candidate scored by the refit fitness computes what the local least-squares
reconstruction of the same plan computes, and the search finds a profile that is free only after the refit."""
import copy
import json
from dataclasses import replace

import pytest
import torch

from depgraph_llm.errors import UserError
from depgraph_llm.job.in_memory import couple_or_explain
from depgraph_llm.job.options import PruneOptions
from depgraph_llm.job.prune import run_prune
from depgraph_llm.planning.budget import Allocation, ParamCounter
from depgraph_llm.planning.fitness import ProfileScorer
from depgraph_llm.planning.plan import PrunePlan
from depgraph_llm.planning.refit_fitness import RefitProfileScorer, RefitSettings
from depgraph_llm.planning.search import Budget, Profile, SearchSettings, evolve, params_of
from depgraph_llm.planning.search_levels import level_database, profile_keep, searched_layers
from depgraph_llm.recovery.reconstruct import reconstruct
from tests.tiny import random_search_scores, save_tiny_checkpoint, tiny_model


def _setup(model):
    coupling = couple_or_explain(model)
    counter = ParamCounter({n: tuple(p.shape) for n, p in model.named_parameters()}, coupling)
    layers = searched_layers(coupling)
    return coupling, counter, layers, level_database(layers, counter, 1, Allocation(), lambda widths: True)


def _windows(count: int, length: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 160, (1, length), generator=generator) for _ in range(count)]


def test_refit_candidate_equals_the_local_least_squares_reconstruction():
    """The reference is built another way: the reconstruction stage (recovery/reconstruct.py, ls, local mode, same
    anchor) on a copy of the model with the plan the profile maps to; its logits must equal the candidate's."""
    model = tiny_model(num_hidden_layers=3, intermediate_size=40)
    coupling, counter, layers, levels = _setup(model)
    scores = random_search_scores(layers, seed=3)
    heads = [lv.heads.index(level) for lv, level in zip(levels, [(2, 1), (2, 2), (1, 2)])]
    profile = Profile(mlp=(20, 39, 9), heads=tuple(heads), dropped=(False,) * 3)
    calibration, held_out = _windows(4, 24, 1), _windows(1, 16, 2)
    ids = _windows(1, 20, 3)[0]
    keep, keep_nested, removed = profile_keep(layers, levels, profile, scores)
    full = counter.count({})
    plan = PrunePlan(model_hash="", model_type="llama", estimator="random", schedule="search", seed=0,
                     ratio_requested=0.3, round_to=1, params_before=full, params_after=params_of(profile, levels, full),
                     keep=keep, keep_nested=keep_nested, removed_layers=removed, reconstruct="ls",
                     reconstruct_mode="local", reconstruct_anchor=0.1)
    reference = copy.deepcopy(model)
    reconstruct(reference, coupling, plan, calibration, method="ls", mode="local")
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        expected = reference(input_ids=ids).logits
        assert not torch.allclose(expected, dense, atol=1e-3)  # the plan does change the model
        with RefitProfileScorer(model, coupling, layers, levels, scores, held_out,
                                RefitSettings(calibration, anchor=0.1)) as scorer:
            scorer.set_profile(profile)
            candidate = model(input_ids=ids).logits
        assert torch.allclose(candidate, expected, atol=1e-4)
        assert torch.equal(model(input_ids=ids).logits, dense)  # weights and hooks restored


PLANTED = 1  # the layer whose second half of MLP channels duplicates the first half


@pytest.fixture(scope="module")
def redundant():
    """3 layers, 32 MLP channels; in layer 1 channels 16..31 compute exactly what channels 0..15 compute, and the
    down projection splits each pair's contribution evenly, so removing one of each pair loses half of the layer's
    MLP output unless the kept half's down columns take it over, which least squares does exactly."""
    model = tiny_model(num_hidden_layers=3, intermediate_size=32)
    mlp = model.model.layers[PLANTED].mlp
    with torch.no_grad():
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[16:] = proj.weight[:16]
        down = mlp.down_proj.weight
        down[:, :16] = (down[:, :16] + down[:, 16:]) / 2
        down[:, 16:] = down[:, :16]
        down.mul_(30)  # a random tiny model's MLPs barely move the stream: make this one matter
    coupling, counter, layers, levels = _setup(model)
    levels = [replace(lv, heads=lv.heads[-1:], head_saving=lv.head_saving[-1:]) for lv in levels]  # heads fixed
    torch.manual_seed(5)
    scores = {lg.mlp.name: torch.rand(lg.mlp.size) + 1 for lg in layers}
    scores[layers[PLANTED].mlp.name][16:] = torch.rand(16) * 0.5  # the copies rank lowest in their layer
    return model, coupling, counter, layers, levels, scores


def test_search_finds_the_profile_that_only_the_refit_makes_free(redundant):
    model, coupling, counter, layers, levels, scores = redundant
    full = counter.count({})
    free = Profile(mlp=tuple(15 if i == PLANTED else 31 for i in range(3)), heads=(0,) * 3, dropped=(False,) * 3)
    budget = Budget(full=full, low=params_of(free, levels, full), high=params_of(free, levels, full))
    start = Profile(mlp=(26, 26, 25), heads=(0,) * 3, dropped=(False,) * 3)
    assert params_of(start, levels, full) == budget.high  # 16 channels removed either way
    calibration, held_out = _windows(6, 24, 1), _windows(2, 24, 2)
    settings = SearchSettings(generations=25, offspring=8, survivors=2, held_out_windows=2, time_limit_s=None)
    refit = RefitSettings(calibration, anchor=0.0, damp=1e-9)  # exact least squares: the free profile costs 0
    with RefitProfileScorer(model, coupling, layers, levels, scores, held_out, refit) as scorer:
        free_cost = scorer(free)
        assert free_cost < 1e-4 * scorer(start)
        found = evolve(start, levels, budget, scorer, settings, seed=0)
    with ProfileScorer(model, coupling, layers, levels, scores, held_out) as masked:
        assert masked(free) > 1e4 * free_cost  # masked, the free profile loses half of layer 1's MLP output
        masked_found = evolve(start, levels, budget, masked, settings, seed=0)
    assert found.profile == free and found.fitness == pytest.approx(free_cost, abs=1e-12)
    assert masked_found.profile != free


def test_prune_records_the_refit_fitness_and_refuses_it_without_a_refit(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "tiny", num_hidden_layers=3, intermediate_size=32)
    options = {"model": str(folder), "ratio": 0.2, "schedule": "search", "search_generations": 2, "seq_len": 32,
               "calibration_samples": 2, "round_to": 1, "show_progress": False, "evaluate": False}
    run_prune(PruneOptions(out=tmp_path / "out", search_fitness="refit", **options))
    search = json.loads((tmp_path / "out" / "prune_plan.json").read_text())["search"]
    assert search["refit"]["anchor"] == PruneOptions().reconstruct_anchor and search["refit"]["solves"] > 0
    assert "refitted" in search["fitness"]
    with pytest.raises(UserError, match="search-fitness refit"):
        PruneOptions(out=tmp_path / "o2", search_fitness="refit", reconstruct="none", **options).validate()
    with pytest.raises(UserError, match="search-fitness"):
        PruneOptions(out=tmp_path / "o3", search_fitness="exact", **options).validate()
