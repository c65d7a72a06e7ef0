"""Experiment (docs/results/bench-grid, session 14): what a stock checkpoint could gain from allocation. Runs
`prune.py --schedule search --dry-run` with the evolution replaced by a probe that scores, with the search's own
fitness (KL from the dense model on held-aside windows, removed units masked, no reconstruction), every profile a
stock config can hold at the uniform plan's budget: the same attention level in every layer with the widest uniform
MLP that fits, then for the two best levels every single dropped layer and every pair of the six best singles.

    OMP_NUM_THREADS=2 python scripts/experiment_stock_profiles.py --ratio 0.2 --schedule search --dry-run

Not a feature: it patches planning/search_schedule.py's `evolve` for this process only and keeps the uniform plan.
"""
from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path

import depgraph_llm.planning.search_schedule as search_schedule
from depgraph_llm.planning.search import Profile, SearchResult, params_of

ROOT = Path(__file__).resolve().parents[1]


def probe(start, levels, budget, fitness, settings, seed, progress=None, clock=None):
    n = len(levels)

    def uniform(head_level: int, dropped: tuple[int, ...] = ()) -> Profile | None:
        """The widest uniform MLP level that keeps the profile at or under the budget's upper end."""
        best = None
        for level in range(len(levels[0].mlp)):
            candidate = Profile((level,) * n, (head_level,) * n, tuple(i in dropped for i in range(n)))
            if params_of(candidate, levels, budget.full) > budget.high:
                break
            best = candidate
        return best

    began = time.time()
    start_kl = fitness(start, None)
    print(f"uniform plan: mlp {levels[0].mlp[start.mlp[0]]} heads {levels[0].heads[start.heads[0]]} "
          f"KL {start_kl:.4f}", flush=True)
    by_heads = []
    for head_level in range(len(levels[0].heads)):
        profile = uniform(head_level)
        if profile is None:
            continue
        kl = fitness(profile, None)
        by_heads.append((kl, head_level))
        print(f"heads {levels[0].heads[head_level]} mlp {levels[0].mlp[profile.mlp[0]]} "
              f"params {params_of(profile, levels, budget.full)} KL {kl:.4f}", flush=True)
    for _, head_level in sorted(by_heads)[:2]:
        singles = sorted((fitness(p, None), layer) for layer in range(n) if (p := uniform(head_level, (layer,))))
        print(f"heads {levels[0].heads[head_level]} one layer dropped, best:",
              [(layer, round(kl, 4)) for kl, layer in singles[:8]], flush=True)
        best = [layer for _, layer in singles[:6]]
        pairs = sorted((fitness(p, None), a, b, levels[0].mlp[p.mlp[0]])
                       for i, a in enumerate(best) for b in best[i + 1:] if (p := uniform(head_level, (a, b))))
        print("   two layers dropped, best (a, b, mlp, KL):",
              [(a, b, width, round(kl, 4)) for kl, a, b, width in pairs[:5]], flush=True)
    print(f"probe time {time.time() - began:.1f} s", flush=True)
    return SearchResult(start, start_kl, start_kl)


if __name__ == "__main__":
    search_schedule.evolve = probe
    sys.argv = ["prune.py", *sys.argv[1:]]
    runpy.run_path(str(ROOT / "prune.py"), run_name="__main__")
