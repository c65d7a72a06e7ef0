#!/usr/bin/env python
"""The two latest reconstruction pieces switched off one at a time: the default recipe (head OBS for query heads
nested in KV groups, exact sequential statistics) against the planner's own head choice, and against one-pass
sequential statistics, at 0.25 and 0.5 removed, side by side in one process on the same calibration windows;
perplexity on the evaluation parts of three registers (fortunes and the Jargon File are never calibrated on;
licences are calibrated on, but on another part).

    OMP_NUM_THREADS=1 python scripts/bench_reconstruction.py --out docs/results/bench-reconstruction
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from depgraph_llm.job import in_memory  # noqa: E402
from depgraph_llm.job.options import PruneOptions  # noqa: E402
from depgraph_llm.job.inputs import calibration_batches  # noqa: E402
from depgraph_llm.calibration.sources import default_calibration_source  # noqa: E402
from depgraph_llm.checkpoint.loading import load_model, resolve_model_path  # noqa: E402
from depgraph_llm.calibration.corpora import available_registers, corpus_part  # noqa: E402
from depgraph_llm.evaluation.perplexity import perplexity  # noqa: E402
from depgraph_llm.recovery import reconstruct  # noqa: E402
from depgraph_llm.cli.summary import table  # noqa: E402

REGISTERS = ("fortunes", "jargon", "licences")


def evaluate(model, tokenizer, texts: dict[str, str], tokens: int) -> dict[str, float]:
    return {name: round(perplexity(model, tokenizer, text, 512, tokens, False).perplexity, 3)
            for name, text in texts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-reconstruction"))
    args = parser.parse_args()
    model, tokenizer = load_model(resolve_model_path(args.model))
    texts = {r: corpus_part(r, "evaluation").text for r in available_registers(REGISTERS)}
    options = PruneOptions(model=args.model or "", ratio=0.25, show_progress=False)
    source = default_calibration_source()
    calibration = calibration_batches(model, tokenizer, source, options)
    rows = [{"row": "dense", "ratio": 0.0, **evaluate(model, tokenizer, texts, args.eval_tokens)}]
    print(json.dumps(rows[-1]), flush=True)
    nested_heads, restat = reconstruct._nested_heads, reconstruct.Reconstruction.restat
    variants = {"default": (nested_heads, restat), "planner's heads": (lambda owners: None, restat),
                "one-pass sequential": (nested_heads, lambda self, step, consumers: None)}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for label, (chooser, statistics) in variants.items():
            reconstruct._nested_heads, reconstruct.Reconstruction.restat = chooser, statistics
            pruned = copy.deepcopy(model)
            torch.manual_seed(0)
            began = time.perf_counter()
            plan, _ = in_memory.prune_in_memory(pruned, calibration, PruneOptions(
                model=options.model, ratio=ratio, show_progress=False))
            rows.append({"row": label, "ratio": ratio, "achieved": round(plan.ratio_achieved, 4),
                         "prune_s": round(time.perf_counter() - began, 1),
                         **evaluate(pruned, tokenizer, texts, args.eval_tokens)})
            print(json.dumps(rows[-1]), flush=True)
    reconstruct._nested_heads, reconstruct.Reconstruction.restat = nested_heads, restat
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"calibration": source.record(options.seq_len, len(calibration), options.seed), "rows": rows,
              "command": "OMP_NUM_THREADS=1 python scripts/bench_reconstruction.py " + " ".join(sys.argv[1:])}
    (args.out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    dense = rows[0]
    lines = [[r["row"], r["ratio"], *(f"{r[n]:.2f} (x{r[n] / dense[n]:.2f})" for n in texts)] for r in rows]
    text = table(lines, ["row", "ratio", *texts])
    (args.out / "results.md").write_text("```\n" + text + "\n```\n")
    print(text)


if __name__ == "__main__":
    main()
