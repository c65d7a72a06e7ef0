#!/usr/bin/env python
"""Saved checkpoints (e.g. `prune.py --schedule uniform` and `--schedule search` at the same ratio) side by side on
the evaluation parts of the three registers scripts/bench_reconstruction.py uses (fortunes and the Jargon File are
never calibrated on; licences are, on another part), with the dense model as the reference row.

    OMP_NUM_THREADS=1 python prune.py --ratio 0.25 --out /tmp/uniform25
    OMP_NUM_THREADS=1 python prune.py --ratio 0.25 --schedule search --out /tmp/search25
    OMP_NUM_THREADS=1 python scripts/bench_search.py uniform=/tmp/uniform25 search=/tmp/search25 \
        --out docs/results/bench-search
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from depgraph_llm.checkpoint.loading import load_model, load_pruned, resolve_model_path  # noqa: E402
from depgraph_llm.calibration.corpora import available_registers, corpus_part  # noqa: E402
from depgraph_llm.evaluation.perplexity import perplexity  # noqa: E402
from depgraph_llm.cli.summary import table  # noqa: E402

REGISTERS = ("fortunes", "jargon", "licences")  # as scripts/bench_reconstruction.py


def evaluate(model, tokenizer, texts: dict[str, str], tokens: int) -> dict[str, float]:
    return {name: round(perplexity(model, tokenizer, text, 512, tokens, False).perplexity, 3)
            for name, text in texts.items()}


def row_of(label: str, folder: Path, model, tokenizer, texts: dict[str, str], tokens: int) -> dict:
    """One checkpoint's row: its plan's schedule, achieved ratio, search record summary and perplexities."""
    plan = json.loads((folder / "prune_plan.json").read_text())
    report = json.loads((folder / "prune_report.json").read_text())
    search = plan.get("search") or {}
    return {"row": label, "folder": str(folder), "schedule": plan["schedule"],
            "achieved": round(1 - plan["params_after"] / plan["params_before"], 4),
            "removed_layers": plan["removed_layers"],
            "search_kl": [search.get("start_fitness"), search.get("best_fitness")] if search else None,
            "prune_timings_s": report.get("timings_s"), **evaluate(model, tokenizer, texts, tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="label=folder of a pruned checkpoint")
    parser.add_argument("--model", default=None, help="the dense model the checkpoints were pruned from")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-search"))
    args = parser.parse_args()
    model, tokenizer = load_model(resolve_model_path(args.model))
    texts = {r: corpus_part(r, "evaluation").text for r in available_registers(REGISTERS)}
    rows = [{"row": "dense", **evaluate(model, tokenizer, texts, args.eval_tokens)}]
    print(json.dumps(rows[-1]), flush=True)
    for item in args.checkpoints:
        label, _, folder = item.partition("=")
        rows.append(row_of(label, Path(folder), load_pruned(folder).eval(), tokenizer, texts, args.eval_tokens))
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"rows": rows, "eval_tokens": args.eval_tokens,
              "command": "OMP_NUM_THREADS=1 python scripts/bench_search.py " + " ".join(sys.argv[1:])}
    (args.out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    dense = rows[0]
    lines = [[r["row"], r.get("achieved", 0.0), *(f"{r[n]:.2f} (x{r[n] / dense[n]:.2f})" for n in texts)]
             for r in rows]
    text = table(lines, ["row", "ratio", *texts])
    (args.out / "results.md").write_text("```\n" + text + "\n```\n")
    print(text)


if __name__ == "__main__":
    main()
