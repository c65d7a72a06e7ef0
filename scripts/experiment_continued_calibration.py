"""Experiment (docs/results/bench-grid, session 14): replace a fraction FRAC of the default calibration windows by
the dense model's own continuations (Ji et al., "Beware of Calibration Data for Pruning LLMs": prompt the model with
the start of real text, calibrate on what it writes). Each generated window opens with OPEN tokens of a calibration
window that is not otherwise used (a second draw of the same registers, another seed) and goes on with seq_len - OPEN
tokens sampled at temperature 1 (end-of-text suppressed); real and generated windows alternate. Then prune with the
given prune.py flags and print the perplexity on each register's evaluation part, as scripts/bench_grid.py measures it.

    FRAC=0.5 OMP_NUM_THREADS=1 python scripts/experiment_continued_calibration.py --ratio 0.2 --out DIR --no-eval

Not a feature: it patches `CalibrationSource.windows` for this process only (the held-aside windows of
`--schedule search` would be patched too).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grid import prune_and_score

from depgraph_llm.calibration import sources

FRACTION = float(os.environ.get("FRAC", "0.5"))
OPENING = int(os.environ.get("OPEN", "32"))
OPENING_SEED = 104_729      # added to --seed: the draw the openings come from
SAMPLING_SEED = 2_000_003   # added to --seed: the sampling
real_windows = sources.CalibrationSource.windows


@torch.no_grad()
def continuations(model, tokenizer, openings: list[list[int]], seq_len: int, seed: int) -> list[torch.Tensor]:
    """seq_len-token windows: each opening and what the model samples after it (global RNG left as it was)."""
    special = sorted(set(getattr(tokenizer, "all_special_ids", []) or [])) or None
    windows = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for start in range(0, len(openings), 4):
            ids = torch.tensor(openings[start:start + 4])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                                 temperature=1.0, max_new_tokens=seq_len - ids.shape[1],
                                 min_new_tokens=seq_len - ids.shape[1], suppress_tokens=special,
                                 pad_token_id=tokenizer.pad_token_id or 0)
            windows.extend(row[:seq_len].unsqueeze(0) for row in out)
            print(f"continuations: {len(windows)}/{len(openings)}", file=sys.stderr, flush=True)
    return windows


def mixed_windows(self, model, tokenizer, seq_len: int, count: int, seed: int, show_progress: bool = False):
    """The default mix's windows with round(FRAC * count) of them replaced by continuations."""
    real = real_windows(self, model, tokenizer, seq_len, count, seed, show_progress)
    generated = round(count * FRACTION)
    if self.label != "mixed" or generated == 0:
        return real
    other = real_windows(self, model, tokenizer, seq_len, count + generated, seed + OPENING_SEED, False)
    unused = [w for w in other if not any(torch.equal(w, r) for r in real)][:generated]
    written = continuations(model, tokenizer, [w[0, :OPENING].tolist() for w in unused], seq_len,
                            seed + SAMPLING_SEED)
    kept = real[:count - generated]
    return [w for pair in zip(kept + [None] * len(written), written + [None] * len(kept)) for w in pair
            if w is not None][:count]


def main() -> int:
    sources.CalibrationSource.windows = mixed_windows
    return prune_and_score({"fraction": FRACTION, "opening": OPENING})


if __name__ == "__main__":
    sys.exit(main())
