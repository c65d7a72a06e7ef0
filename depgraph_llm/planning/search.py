"""`--schedule search`: an evolutionary search over per-layer profiles at a fixed parameter budget (EvoPress-style).

A profile gives every decoder layer an MLP width level, an attention level (KV groups x query heads per group) and
whether the layer is dropped. The level tables (`LayerLevels`) hold the exact parameters each level removes, so a
profile's count is a sum; the budget is a narrow band of parameter counts. Each generation mutates the parent into
`offspring` candidates (level moves, then a repair back into the band and a fill of what is left of it), scores
them on a few held-aside windows, rescores the best on all of them and keeps the best of parent and survivors
(EvoPress's multi-step selection). Everything here is pure: the fitness is a callable
`fitness(profile, windows) -> float` (lower is better) supplied by the caller.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

LAYER_DROP_CHANCE = 0.15  # with --search-layer-drops (off by default: OBS cannot recover a dropped layer)
HeadLevel = tuple[int | None, int | None]  # (KV groups or heads kept, query heads per KV group kept)


@dataclass(frozen=True)
class LayerLevels:
    """One decoder layer's choices, each with the exact parameters it removes (ascending in parameters kept)."""

    layer: int
    mlp: tuple[int | None, ...]        # MLP widths (None: the layer has no MLP group)
    mlp_saving: tuple[int, ...]        # parameters removed at each MLP width
    heads: tuple[HeadLevel, ...]       # attention levels
    head_saving: tuple[int, ...]
    drop_saving: int                   # parameters removed by dropping the whole layer
    coarse: int = 1                    # MLP levels moved per mutation step (fine levels are for the repair)


@dataclass(frozen=True)
class Profile:
    """Level index per layer (into LayerLevels.mlp / .heads) and which layers are dropped."""

    mlp: tuple[int, ...]
    heads: tuple[int, ...]
    dropped: tuple[bool, ...]

    def is_uniform(self, levels: list[LayerLevels]) -> bool:
        """Same widths in every layer and no layer dropped (saves as a stock checkpoint)."""
        return (not any(self.dropped) and len({lv.mlp[i] for lv, i in zip(levels, self.mlp)}) <= 1
                and len({lv.heads[i] for lv, i in zip(levels, self.heads)}) <= 1)


@dataclass(frozen=True)
class Budget:
    """Parameter counts a candidate may have: full model count, and the band [low, high]."""

    full: int
    low: int
    high: int

    def holds(self, params: int) -> bool:
        return self.low <= params <= self.high


@dataclass(frozen=True)
class SearchSettings:
    """How much the search evaluates: generations x offspring on the first window, survivors on all windows."""

    generations: int = 20
    offspring: int = 8
    survivors: int = 2
    first_windows: int = 1
    max_moves: int = 3        # level moves per mutation: 1..max_moves
    drop_chance: float = 0.0  # chance that a move toggles a layer's drop (--search-layer-drops: LAYER_DROP_CHANCE)
    held_out_windows: int = 4  # held-aside windows the fitness is measured on
    held_out_tokens: int = 128  # tokens per held-aside window
    time_limit_s: float | None = 600.0  # no generation starts after this many seconds (None: run every generation)


@dataclass
class SearchResult:
    """The best profile found, its fitness on all windows, the start's, and the fitness after each generation."""

    profile: Profile
    fitness: float
    start_fitness: float
    history: list[float] = field(default_factory=list)
    evaluations: int = 0
    stopped_by: str = "generations"  # or "time limit": the last generations were not run


def params_of(profile: Profile, levels: list[LayerLevels], full: int) -> int:
    """Exact parameter count of a profile (the level savings add up: no parameter is shared between layers)."""
    removed = 0
    for lv, m, h, gone in zip(levels, profile.mlp, profile.heads, profile.dropped):
        removed += lv.drop_saving if gone else lv.mlp_saving[m] + lv.head_saving[h]
    return full - removed


def _moves(profile: Profile, levels: list[LayerLevels], direction: int, fine: bool) -> list[tuple[str, int, int]]:
    """Width moves (kind, layer index, new level) that change parameters in `direction` (+1 more, -1 fewer)."""
    moves = []
    for i, lv in enumerate(levels):
        if profile.dropped[i]:
            continue
        step = 1 if fine else lv.coarse
        m = min(max(profile.mlp[i] + direction * step, 0), len(lv.mlp) - 1)
        if m != profile.mlp[i]:
            moves.append(("mlp", i, m))
        h = profile.heads[i] + direction
        if not fine and 0 <= h < len(lv.heads):
            moves.append(("heads", i, h))
    return moves


def _apply(profile: Profile, move: tuple[str, int, int]) -> Profile:
    kind, i, level = move
    values = list(getattr(profile, kind))
    values[i] = level
    return replace(profile, **{kind: tuple(values)})


def _toggle_drop(profile: Profile, i: int) -> Profile:
    dropped = list(profile.dropped)
    dropped[i] = not dropped[i]
    return replace(profile, dropped=tuple(dropped))


def repair(profile: Profile, levels: list[LayerLevels], budget: Budget, rng: random.Random,
           limit: int = 10_000) -> Profile | None:
    """Random width moves back into the band (each one that does not jump past it; the smallest if none), then
    fine moves up while they fit; None if the band cannot be reached."""
    for _ in range(limit):
        params = params_of(profile, levels, budget.full)
        if budget.holds(params):
            return fill(profile, levels, budget, rng)
        direction = -1 if params > budget.high else 1
        room = params - budget.low if direction < 0 else budget.high - params
        moves = _moves(profile, levels, direction, fine=False) + _moves(profile, levels, direction, fine=True)
        if not moves:
            return None
        fitting = [m for m in moves if abs(_saving_change(profile, levels, m)) <= room]
        move = rng.choice(fitting) if fitting else min(moves, key=lambda m: abs(_saving_change(profile, levels, m)))
        profile = _apply(profile, move)
    return None


def _saving_change(profile: Profile, levels: list[LayerLevels], move: tuple[str, int, int]) -> int:
    kind, i, level = move
    table = levels[i].mlp_saving if kind == "mlp" else levels[i].head_saving
    return table[getattr(profile, kind)[i]] - table[level]


def fill(profile: Profile, levels: list[LayerLevels], budget: Budget, rng: random.Random) -> Profile:
    """Fine MLP moves up, in random order, while the count stays in the band (spends what the budget has left)."""
    while True:
        params = params_of(profile, levels, budget.full)
        moves = [m for m in _moves(profile, levels, 1, fine=True)
                 if params + _saving_change(profile, levels, m) <= budget.high]
        if not moves:
            return profile
        profile = _apply(profile, rng.choice(moves))


def mutate(profile: Profile, levels: list[LayerLevels], budget: Budget, settings: SearchSettings,
           rng: random.Random) -> Profile | None:
    """1..max_moves random level moves (a width up or down, or a layer's drop toggled), then the repair."""
    for _ in range(rng.randint(1, settings.max_moves)):
        if rng.random() < settings.drop_chance:
            i = rng.randrange(len(levels))
            candidate = _toggle_drop(profile, i)
            if all(candidate.dropped):
                continue
            profile = candidate
            continue
        moves = _moves(profile, levels, rng.choice((-1, 1)), fine=False)
        if moves:
            profile = _apply(profile, rng.choice(moves))
    return repair(profile, levels, budget, rng)


def evolve(start: Profile, levels: list[LayerLevels], budget: Budget,
           fitness: Callable[[Profile, int | None], float], settings: SearchSettings, seed: int,
           progress: Callable[[Iterable, int], Iterable] | None = None,
           clock: Callable[[], float] = time.monotonic) -> SearchResult:
    """(1 + offspring) evolution from `start` (which must hold the budget): offspring scored on the first windows,
    the best `survivors` rescored on all windows (None) against the parent; `progress` wraps the generations.
    No generation starts once `settings.time_limit_s` has passed since the start (measured by `clock`)."""
    if not budget.holds(params_of(start, levels, budget.full)):
        raise ValueError("the start profile is outside the budget band")
    rng = random.Random(seed)
    started = clock()
    parent, parent_fit = start, fitness(start, None)
    result = SearchResult(start, parent_fit, parent_fit, evaluations=1)
    generations = range(settings.generations)
    for _ in (progress(generations, settings.generations) if progress else generations):
        if settings.time_limit_s is not None and clock() - started >= settings.time_limit_s:
            result.stopped_by = "time limit"
            break
        children = []
        for _ in range(settings.offspring * 4):  # a mutation the repair cannot fix is drawn again
            child = mutate(parent, levels, budget, settings, rng)
            if child is not None and child != parent and child not in children:
                children.append(child)
            if len(children) == settings.offspring:
                break
        quick = sorted(((fitness(c, settings.first_windows), k, c) for k, c in enumerate(children)),
                       key=lambda t: (t[0], t[1]))
        result.evaluations += len(children)
        for _, _, child in quick[:settings.survivors]:
            score = fitness(child, None)
            result.evaluations += 1
            if score < parent_fit:
                parent, parent_fit = child, score
        result.history.append(parent_fit)
    result.profile, result.fitness = parent, parent_fit
    return result
