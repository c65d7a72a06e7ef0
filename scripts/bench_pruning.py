#!/usr/bin/env python
"""Benchmark table: perplexity of one model pruned at several ratios by every estimator x schedule, depth
pruning, Torch-Pruning as the peer, and retrain-free reconstruction rows (real vs self-generated calibration),
all in one process on the same calibration and evaluation text, no fine-tuning.

    python scripts/bench_pruning.py --out docs/results/bench-pruning            # full table (~1 h on 2 cores)
    python scripts/bench_pruning.py --ratios 0.25 --estimators taylor --no-peer  # a quick slice

Writes results.json, results.md and perplexity_vs_ratio.png to --out. Importance scores are computed once per
estimator and calibration set and reused across ratios (they do not depend on the ratio).
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
from depgraph_llm.calibration.sources import (DEFAULT_CALIBRATION_FILES, DEFAULT_EVAL_FILES, default_files,  # noqa: E402
                                      load_text, self_generated_windows, token_windows)
from depgraph_llm.errors import UserError  # noqa: E402
from depgraph_llm.importance import ESTIMATORS  # noqa: E402
from depgraph_llm.checkpoint.loading import load_model, resolve_model_path  # noqa: E402
from depgraph_llm.cli.summary import table  # noqa: E402
from depgraph_llm.evaluation.perplexity import perplexity  # noqa: E402
from depgraph_llm.recovery.reconstruct import METHODS, MODES  # noqa: E402

RATIOS = (0.1, 0.2, 0.25, 0.35, 0.5)
RECONSTRUCT_RATIOS = (0.2, 0.5)


class ScoreCache:
    """Importance scores per (estimator, calibration name), computed on first use."""

    def __init__(self) -> None:
        self.scores: dict[tuple[str, str], dict] = {}
        self.original = in_memory.score_groups

    def bind(self, key: str):
        def score(model, groups, estimator, batches, show_progress=False):
            slot = (estimator.name, key)
            if slot not in self.scores:
                self.scores[slot] = self.original(model, groups, estimator, batches, show_progress)
            return self.scores[slot]
        in_memory.score_groups = score


def measure(model, tokenizer, eval_text: str, cache: ScoreCache, calibration: list, calibration_name: str,
            ratio: float, **options) -> dict:
    """Prune a copy of `model` and return its row (perplexity, ratio, time)."""
    pruned = copy.deepcopy(model)
    cache.bind(calibration_name)
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        plan, _ = in_memory.prune_in_memory(pruned, calibration, PruneOptions(
            ratio=ratio, show_progress=False, **{"reconstruct": "none", **options}))
    except UserError as exc:
        return {"error": str(exc)}
    seconds = time.perf_counter() - start
    return {"ratio": round(plan.ratio_achieved, 4), "perplexity": perplexity(pruned, tokenizer, eval_text).perplexity,
            "prune_s": round(seconds, 1), "calibration": calibration_name}


def peer_row(model, tokenizer, eval_text: str, calibration: list, ratio: float) -> dict:
    from scripts.bench_torch_pruning import torch_pruning_mlp

    pruned = copy.deepcopy(model)
    total = sum(p.numel() for p in pruned.parameters())
    start = time.perf_counter()
    torch_pruning_mlp(pruned, "taylor", calibration, ratio, 8)
    seconds = time.perf_counter() - start
    return {"ratio": round(1 - sum(p.numel() for p in pruned.parameters()) / total, 4), "prune_s": round(seconds, 1),
            "perplexity": perplexity(pruned, tokenizer, eval_text).perplexity, "calibration": "real"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: embedded SmolLM2-135M)")
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    parser.add_argument("--estimators", default=",".join(sorted(ESTIMATORS)))
    parser.add_argument("--schedules", default="uniform,global,log-increase", help="comma-separated width schedules")
    parser.add_argument("--nonuniform-estimators", default="taylor,fisher,obs,wanda-sp,flap",
                        help="estimators also run with the non-uniform schedules (magnitude and random are skipped)")
    parser.add_argument("--reconstruct-ratios", default=",".join(map(str, RECONSTRUCT_RATIOS)))
    parser.add_argument("--reconstruct-methods", default=",".join(m for m in METHODS if m != "none"))
    parser.add_argument("--no-peer", action="store_true", help="skip Torch-Pruning")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-pruning"))
    parser.add_argument("--replot", action="store_true", help="only rewrite results.md and the plot from results.json")
    parser.add_argument("--calibration-study", action="store_true",
                        help="only the multi-register calibration table (scripts/bench_calibration.py)")
    parser.add_argument("--study-sources", default=None,
                        help="comma-separated calibration sources for --calibration-study (default: all)")
    parser.add_argument("--study-no-dense", action="store_true", help="--calibration-study without the dense row")
    args = parser.parse_args()
    if args.replot:
        replot(args.out)
        return
    if args.calibration_study:
        from scripts.bench_calibration import default_sources, run

        out = args.out if args.out != parser.get_default("out") else Path("docs/results/bench-calibration")
        model, tokenizer = load_model(resolve_model_path(args.model))
        sources = args.study_sources.split(",") if args.study_sources else default_sources()
        run(out, model, tokenizer, str(resolve_model_path(args.model)), [float(r) for r in args.ratios.split(",")],
            sources, dense=not args.study_no_dense)
        return
    ratios = [float(r) for r in args.ratios.split(",") if r]
    model, tokenizer = load_model(resolve_model_path(args.model))
    eval_text = load_text(default_files(DEFAULT_EVAL_FILES))
    real = token_windows(tokenizer, load_text(default_files(DEFAULT_CALIBRATION_FILES)), 512, 8, 0)
    cache = ScoreCache()
    rows: list[dict] = []
    model_name = str(resolve_model_path(args.model))

    def add(kind: str, label: str, row: dict) -> None:
        rows.append({"kind": kind, "method": label, **row})
        print(json.dumps(rows[-1]), flush=True)
        (args.out / "results.json").parent.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"model": model_name, "rows": rows}, indent=1))

    add("dense", "dense", {"ratio": 0.0, "perplexity": perplexity(model, tokenizer, eval_text).perplexity,
                           "prune_s": 0.0, "calibration": "-"})
    recon_ratios = [float(r) for r in args.reconstruct_ratios.split(",") if r]
    if recon_ratios:  # first: the retrain-free reconstruction rows (real vs self-generated calibration)
        start = time.perf_counter()
        generated = self_generated_windows(model, tokenizer, 512, 8, seed=0)
        print(f"self-generated calibration: {time.perf_counter() - start:.1f} s", flush=True)
        for ratio in recon_ratios:
            for name, batches in (("real", real), ("self", generated)):
                add("reconstruct", "taylor, no reconstruction", measure(
                    model, tokenizer, eval_text, cache, batches, name, ratio, importance="taylor"))
                for method in args.reconstruct_methods.split(","):
                    # every method x mode on real text; self-generated text for the sequential mode
                    for mode in (MODES if name == "real" else ("sequential",)):
                        add("reconstruct", f"taylor + {method} ({mode})", measure(
                            model, tokenizer, eval_text, cache, batches, name, ratio, importance="taylor",
                            reconstruct=method, reconstruct_mode=mode))
    nonuniform = [e for e in args.nonuniform_estimators.split(",") if e]
    for ratio in ratios:
        for estimator in args.estimators.split(","):
            for schedule in args.schedules.split(","):
                if schedule != "uniform" and estimator not in nonuniform:
                    continue
                add("importance", f"{estimator} / {schedule}", measure(
                    model, tokenizer, eval_text, cache, real, "real", ratio, importance=estimator, schedule=schedule))
        for metric in ("bi", "angular"):
            add("depth", f"depth-{metric} (taylor trim)", measure(
                model, tokenizer, eval_text, cache, real, "real", ratio, importance="taylor", schedule="depth",
                depth_metric=metric))
        if not args.no_peer:
            add("peer", "Torch-Pruning taylor (MLP only)", peer_row(model, tokenizer, eval_text, real, ratio))
    write_outputs(args.out, model_name, rows)


def write_outputs(out: Path, model: str, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"model": model, "rows": rows}, indent=1))
    dense = rows[0]["perplexity"]
    header = ["kind", "method", "calibration", "ratio", "perplexity", "x dense", "prune s"]
    body = [[r["kind"], r["method"], r.get("calibration", "-"), r.get("ratio", "-"),
             f"{r['perplexity']:.2f}" if "perplexity" in r else r.get("error", "")[:60],
             f"{r['perplexity'] / dense:.2f}" if "perplexity" in r else "-", r.get("prune_s", "-")] for r in rows]
    markdown = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    markdown += "".join("| " + " | ".join(str(c) for c in row) + " |\n" for row in body)
    (out / "results.md").write_text(markdown)
    print(table(body, header))
    plot(out / "perplexity_vs_ratio.png", rows, dense, Path(model).name)


def plot(path: Path, rows: list[dict], dense: float, model_name: str = "") -> None:
    """Perplexity vs ratio: every estimator (uniform), the non-uniform schedules of the loss-based ones, depth,
    the peer, and the sequential reconstructions on real text (the rest is in the table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def shown(r: dict) -> bool:
        method = r["method"]
        if r["kind"] == "reconstruct":
            return r.get("calibration") == "real" and "(sequential)" in method
        if r["kind"] == "importance" and not method.endswith("/ uniform"):
            return method.split(" /")[0] in ("taylor", "fisher")
        return r["kind"] in ("importance", "depth", "peer")

    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if "perplexity" in r and shown(r):
            series.setdefault(r["method"], []).append((r["ratio"], r["perplexity"]))
    fig, ax = plt.subplots(figsize=(10, 6.5))
    colors = plt.get_cmap("tab20").colors
    styles = ["-", "--", ":", "-."]
    for index, (label, points) in enumerate(sorted(series.items())):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=4, label=label,
                color=colors[index % len(colors)], linestyle=styles[(index // len(colors)) % len(styles)],
                linewidth=2.2 if "+" in label else 1.2)
    ax.axhline(dense, color="black", linestyle="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of parameters removed")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"{model_name}: no fine-tuning (thick lines: with reconstruction)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def replot(out: Path) -> None:
    """Rewrite results.md and the plot from an existing results.json."""
    data = json.loads((out / "results.json").read_text())
    write_outputs(out, data["model"], data["rows"])


if __name__ == "__main__":
    main()
