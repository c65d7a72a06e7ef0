"""The math of retrain-free reconstruction for one linear layer whose input channels are pruned.

Every solver works on sufficient statistics of calibration data, never on the activations themselves:
`gram` = X^T X and `cross` = X^T Y (float64), where X are the layer's inputs (tokens x in) and Y the outputs
it should keep producing (tokens x out). Ridge damping `damp * mean(diag(gram))` keeps the systems well posed
when calibration tokens are few.

- least squares (Kwon et al.'s mask tuning, "Rethinking pruning LLMs"' local reconstruction):
  W' = argmin ||X_kept W'^T - Y||^2 + ridge ||W'||^2
  With an anchor a > 0 every damping term pulls toward the original weights W instead of toward zero, and each
  input column also in proportion to its own energy (so the pull does not depend on how the inputs are scaled):
  + sum_i (ridge + a G_ii) ||W'_:,i - W_:,i||^2. Toward zero, a ridge set by the mean energy shrinks the typical
  column hard where one outlier channel holds most of it (SmolLM2's layer 11: mean / median energy ~600). Fewer
  calibration tokens than a few per input dimension overfit the calibration text; the anchor trades calibration
  error for error on other text.
- bias (FLAP): kept weights unchanged, the removed channels' mean contribution moves into the bias.
- OBS (SlimGPT): choose which units to remove greedily by their optimal-brain-surgeon saliency under the
  inverse Hessian H^-1 = (X^T X + ridge)^-1, updating the remaining weights after every removal.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def ridge(gram: torch.Tensor, damp: float) -> float:
    """The ridge added to the diagonal: `damp` times the mean input energy."""
    return damp * float(gram.diagonal().mean().clamp_min(1e-12))


def least_squares(gram: torch.Tensor, cross: torch.Tensor, kept: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Best weights (out, len(kept)) on the kept input columns, in float64."""
    return solve_damped(kept_block(gram, kept), cross[kept], ridge(gram, damp))


def kept_block(gram: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """gram[kept][:, kept] in one gather (no intermediate of len(kept) full rows)."""
    return gram[kept.unsqueeze(1), kept]


@contextmanager
def damped_in_place(gram: torch.Tensor, ridge_value: float | torch.Tensor) -> Iterator[torch.Tensor]:
    """`gram` with `ridge_value` (a number, or one per row) added to its diagonal for the duration of the block,
    restored bit for bit afterwards: no second matrix of its size is made (a Llama-3.1-8B down_proj Gram is 1.6 GB in float64)."""
    diagonal = gram.diagonal()
    undamped = diagonal.clone()
    diagonal.add_(ridge_value)
    try:
        yield gram
    finally:
        diagonal.copy_(undamped)


def solve_damped(gram_kept: torch.Tensor, rhs: torch.Tensor, ridge_value: float | torch.Tensor) -> torch.Tensor:
    """((gram_kept + ridge I)^-1 rhs)^T, damped in place (the factorisation still copies the system once)."""
    with damped_in_place(gram_kept, ridge_value) as damped:
        return torch.linalg.solve(damped, rhs).T


def anchored_least_squares(gram_kept: torch.Tensor, rhs: torch.Tensor, original_kept: torch.Tensor,
                           ridge_value: float, anchor: float) -> torch.Tensor:
    """Weights (out, kept) minimising ||X_k W'^T - Y||^2 + sum_i (ridge + anchor G_ii) ||W'_:,i - W_:,i||^2, where
    rhs = X_k^T Y and `original_kept` = W (out, kept); anchor 0 is `solve_damped` exactly (the ridge toward zero)."""
    if anchor == 0:
        return solve_damped(gram_kept, rhs, ridge_value)
    pull = anchor * gram_kept.diagonal().clone() + ridge_value
    return solve_damped(gram_kept, rhs + pull[:, None] * original_kept.T, pull)


def damped_inverse(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """(gram + ridge I)^-1 without an identity matrix or a damped copy beside `gram` (damped in place)."""
    with damped_in_place(gram, ridge(gram, damp)) as damped:
        return torch.linalg.inv(damped)


def bias_correction(mean_x: torch.Tensor, mean_y: torch.Tensor, weight: torch.Tensor,
                    kept: torch.Tensor) -> torch.Tensor:
    """Bias (out,) that restores the mean output when only the kept columns of `weight` (unchanged) remain.

    With local statistics (mean_y = W mean_x + b) this is FLAP's b + W[:, removed] mean_x[removed]."""
    return mean_y - weight[:, kept].double() @ mean_x[kept]


def obs_select(weight: torch.Tensor, gram: torch.Tensor, units: list[torch.Tensor], n_remove: int,
               damp: float = 0.01, steps: int | None = 64) -> list[int]:
    """Indices of the `n_remove` units (each a set of input columns) that structured OBS removes.

    Greedy: at each step the unit(s) with the least saliency tr(W_u (H^-1_uu)^-1 W_u^T) go, then W and H^-1
    are updated exactly for their removal. `steps` bounds the number of greedy rounds (SlimGPT-style batched
    greedy for speed); `steps=None` removes one unit per round (pure greedy)."""
    if n_remove <= 0:
        return []
    w = weight.double().clone()
    h_inv = damped_inverse(gram, damp)
    alive = list(range(len(units)))
    removed: list[int] = []
    rounds = n_remove if steps is None else min(steps, n_remove)
    single = all(len(u) == 1 for u in units)
    for round_index in range(rounds):
        take = -(-(n_remove - len(removed)) // (rounds - round_index))
        if single:
            cols = torch.stack([units[u][0] for u in alive])
            saliency = (w[:, cols] ** 2).sum(0) / h_inv.diagonal()[cols]
        else:
            saliency = torch.stack([block_saliency(w, h_inv, units[u]) for u in alive])
        order = torch.argsort(saliency, stable=True)[:take].tolist()
        chosen = [alive[i] for i in order]
        remove_columns(w, h_inv, torch.cat([units[u] for u in chosen]))
        removed.extend(chosen)
        alive = [u for u in alive if u not in set(chosen)]
    return removed


def remove_columns(w: torch.Tensor, h_inv: torch.Tensor, cols: torch.Tensor) -> None:
    """The exact OBS update of the remaining weights and of H^-1, in place, when the columns `cols` go."""
    block_inv = torch.linalg.inv(h_inv[cols][:, cols])
    w -= w[:, cols] @ block_inv @ h_inv[cols]
    h_inv -= h_inv[:, cols] @ block_inv @ h_inv[cols]
    w[:, cols] = 0
    h_inv[cols] = 0
    h_inv[:, cols] = 0


def block_saliency(w: torch.Tensor, h_inv: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """tr(W_u (H^-1_uu)^-1 W_u^T): the output error OBS adds by removing the columns `cols`."""
    w_u = w[:, cols]
    return torch.trace(w_u @ torch.linalg.solve(h_inv[cols][:, cols], w_u.T))
