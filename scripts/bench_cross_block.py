#!/usr/bin/env python
"""The default recipe against the default recipe + cross-block refit (recovery/cross_block.py) on the default model:
perplexity on the evaluation parts of the three registers of bench_reconstruction.py (fortunes and jargon never
calibrated on, licences calibrated on another part), and the block-output errors the reconstruction pass records
on the calibration windows and on held-out windows (the default evaluation text, as prune.py takes them).

    OMP_NUM_THREADS=1 python scripts/bench_cross_block.py --rows "2:2:1e-5" --out docs/results/bench-cross-block

A row is WINDOW:EPOCHS:LR[:REG]; "0" is the default recipe without the refit.
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
from depgraph_llm.job.inputs import calibration_batches, heldout_windows  # noqa: E402
from depgraph_llm.calibration.sources import default_calibration_source, evaluation_text  # noqa: E402
from depgraph_llm.checkpoint.loading import load_model, resolve_model_path  # noqa: E402
from depgraph_llm.calibration.corpora import available_registers, corpus_part  # noqa: E402
from depgraph_llm.cli.summary import table  # noqa: E402
from scripts.bench_reconstruction import REGISTERS, evaluate  # noqa: E402


def row_options(row: str) -> dict:
    """"W:E:LR[:REG]" -> the PruneOptions fields of that cross-block refit ("0": none)."""
    parts = row.split(":")
    if parts == ["0"]:
        return {}
    window, epochs, lr, *reg = parts
    return dict(cross_block=int(window), cross_block_epochs=int(epochs), cross_block_lr=float(lr),
                cross_block_reg=float(reg[0]) if reg else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--rows", default="0,2:2:1e-5", help="comma-separated WINDOW:EPOCHS:LR[:REG] rows")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-cross-block"))
    args = parser.parse_args()
    model, tokenizer = load_model(resolve_model_path(args.model))
    texts = {r: corpus_part(r, "evaluation").text for r in available_registers(REGISTERS)}
    options = PruneOptions(model=args.model or "", ratio=args.ratio, show_progress=False)
    source = default_calibration_source()
    calibration = calibration_batches(model, tokenizer, source, options)
    eval_text, eval_files = evaluation_text(None)
    heldout = heldout_windows(tokenizer, eval_text, calibration, options)
    rows = [{"row": "dense", "ratio": 0.0, **evaluate(model, tokenizer, texts, args.eval_tokens)}]
    print(json.dumps(rows[-1]), flush=True)
    for row in args.rows.split(","):
        pruned = copy.deepcopy(model)
        torch.manual_seed(0)
        began = time.perf_counter()
        plan, _ = in_memory.prune_in_memory(pruned, calibration, PruneOptions(
            model=options.model, ratio=args.ratio, show_progress=False, **row_options(row)), heldout=heldout)
        seconds = round(time.perf_counter() - began, 1)
        report = plan.reconstruct_report
        rows.append({"row": "default" if row == "0" else f"+ cross-block {row}", "ratio": args.ratio,
                     "achieved": round(plan.ratio_achieved, 4), "prune_s": seconds,
                     **evaluate(pruned, tokenizer, texts, args.eval_tokens),
                     "error_calibration": report["error_calibration"], "error_heldout": report["error_heldout"],
                     **({"cross_block": report["cross_block"]} if "cross_block" in report else {})})
        print(json.dumps(rows[-1]), flush=True)
        del pruned
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"calibration": source.record(options.seq_len, len(calibration), options.seed),
              "heldout": {"files": eval_files, "windows": len(heldout)}, "rows": rows,
              "command": "OMP_NUM_THREADS=1 python scripts/bench_cross_block.py " + " ".join(sys.argv[1:])}
    (args.out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    dense = rows[0]
    lines = [[r["row"], r["ratio"], *(f"{r[n]:.2f} (x{r[n] / dense[n]:.2f})" for n in texts),
              *((f"{r['error_calibration']['mean']:.4f}", f"{r['error_heldout']['mean']:.4f}",
                 f"{r['error_calibration']['last']:.4f}", f"{r['error_heldout']['last']:.4f}", r["prune_s"])
                if "error_calibration" in r else ("", "", "", "", ""))] for r in rows]
    text = table(lines, ["row", "ratio", *texts, "err cal (mean)", "err held-out (mean)", "err cal (last)",
                         "err held-out (last)", "prune s"])
    (args.out / "results.md").write_text("```\n" + text + "\n```\n")
    print(text)


if __name__ == "__main__":
    main()
