#!/usr/bin/env python
"""The retrain-free grid: each recipe (row) at each ratio, pruned by `prune.py` in a fresh process with the
default calibration, then evaluated on the evaluation parts of four registers: fortunes, the Jargon File and Jane
Austen's novels are never calibrated on; licences are, on another part. Rows append to results.jsonl as they
finish, so a grid can be filled over several sessions; results.md and perplexity_vs_ratio.png are rewritten from
all rows, the newest line of each (row, ratio) winning. A row measured before a register was added is pruned again
with `--backfill` (pruning is deterministic, so its other registers must come out the same).

    OMP_NUM_THREADS=1 python scripts/bench_grid.py --ratios 0.2,0.5 --rows default,search+cross-block \
        --out docs/results/bench-grid
    python scripts/bench_grid.py --render --out docs/results/bench-grid
    python scripts/bench_grid.py --score DIR [DIR ...]   # a checkpoint made elsewhere, x the grid's dense row
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from depgraph_llm.calibration.corpora import available_registers, corpus_part  # noqa: E402
from depgraph_llm.checkpoint.loading import load_model, resolve_model_path  # noqa: E402
from depgraph_llm.cli.summary import table  # noqa: E402
from depgraph_llm.errors import UserError  # noqa: E402
from depgraph_llm.evaluation.perplexity import dense_equivalent_ratio, perplexity  # noqa: E402

REGISTERS = ("fortunes", "jargon", "novels", "licences")
CROSS_BLOCK = ["--cross-block", "2", "--cross-block-epochs", "4", "--cross-block-lr", "1e-4"]
ROWS: dict[str, list[str]] = {  # label -> prune.py flags on top of --ratio
    "no-reconstruct": ["--reconstruct", "none"],
    "default": [],  # uniform widths, taylor + obs (sequential)
    "search": ["--schedule", "search"],
    "cross-block": CROSS_BLOCK,
    "search+cross-block": ["--schedule", "search", *CROSS_BLOCK],
    "torch-pruning": [],  # the peer: Torch-Pruning's Taylor on MLP channels, same calibration windows (peer_child)
}


def evaluate(model, tokenizer, texts: dict[str, str], tokens: int) -> dict:
    """Perplexity per register, and under "per_byte" its [NLL per byte, bytes per token] (for rows whose
    tokenizer differs from the dense one: --vocab-keep)."""
    results = {name: perplexity(model, tokenizer, text, 512, tokens, False) for name, text in texts.items()}
    return {**{name: round(r.perplexity, 3) for name, r in results.items()},
            "per_byte": {name: [r.nll_per_byte, r.bytes_per_token] for name, r in results.items()}}


def register_texts() -> dict[str, str]:
    """The evaluation part of every register that is installed."""
    return {r: corpus_part(r, "evaluation").text for r in available_registers(REGISTERS)}


def evaluate_folder(folder: Path, texts: dict[str, str], tokens: int) -> dict:
    """`evaluate` on a saved checkpoint (stock or per-layer) with its own tokenizer, which --vocab-keep shrinks;
    a missing or unreadable folder is a one-line UserError."""
    model, tokenizer = load_model(resolve_model_path(str(folder)))
    return evaluate(model, tokenizer, texts, tokens)


def peer_child(ratio: float, out: Path, model: str | None) -> None:
    """Torch-Pruning (MLP channels only, see scripts/bench_torch_pruning.py) on the windows `prune.py` would
    calibrate on by default (same source, count, length and seed), saved like a prune.py output."""
    import torch

    from bench_torch_pruning import torch_pruning_mlp
    from depgraph_llm.calibration.sources import default_calibration_source
    from depgraph_llm.job.options import PruneOptions

    options = PruneOptions(ratio=ratio)
    dense, tokenizer = load_model(resolve_model_path(model))
    windows = default_calibration_source().windows(dense, tokenizer, options.seq_len, options.calibration_samples,
                                                   options.seed, False)
    before = sum(p.numel() for p in dense.parameters())
    torch.manual_seed(options.seed)
    torch_pruning_mlp(dense, "taylor", windows, ratio, options.round_to)
    dense.save_pretrained(out)
    tokenizer.save_pretrained(out)
    after = sum(p.numel() for p in dense.parameters())
    (out / "prune_report.json").write_text(json.dumps({"ratio_achieved": round(1 - after / before, 6)}))


def prune_row(label: str, ratio: float, out: Path, model: str | None) -> dict:
    """One prune in a child process; its wall time, CPU time and what its report says it did."""
    command = [sys.executable, str(ROOT / "prune.py"), "--ratio", str(ratio), "--out", str(out), "--no-eval",
               *(["--model", model] if model else []), *ROWS[label]]
    if label == "torch-pruning":
        command = [sys.executable, __file__, "--peer-child", str(ratio), str(out),
                   *(["--model", model] if model else [])]
    start, cpu_before = time.perf_counter(), os.times()
    result = subprocess.run(command, capture_output=True, text=True)
    wall, cpu_after = time.perf_counter() - start, os.times()
    if result.returncode != 0:
        raise SystemExit(f"{label} at {ratio} failed: {(result.stderr.strip().splitlines() or [''])[-1]}")
    report = json.loads((out / "prune_report.json").read_text())
    return {"row": label, "ratio": ratio, "achieved": report["ratio_achieved"], "wall_s": round(wall, 1),
            "cpu_s": round(cpu_after.children_user + cpu_after.children_system
                           - cpu_before.children_user - cpu_before.children_system, 1),
            "command": " ".join(["python", Path(command[1]).name, *command[2:]]).replace(str(out), "OUT"),
            "timings_s": report.get("timings_s"), "vocabulary": report.get("vocabulary"),
            "block_error": {k: report.get("reconstruct_report", {}).get(k) for k in ("error_calibration",
                                                                                     "error_heldout")}}


def latest_rows(results: Path) -> list[dict]:
    """The newest line of each (row, ratio) in results.jsonl, in file order of first appearance."""
    newest: dict[tuple, dict] = {}
    for line in results.read_text().splitlines() if results.exists() else []:
        if line.strip():
            row = json.loads(line)
            newest[(row["row"], row.get("ratio"))] = row
    return list(newest.values())


def ratio_to_dense(row: dict, dense: dict, register: str) -> tuple[float, bool]:
    """Perplexity ratio to dense, and whether it had to be taken per byte because the row's tokenizer spells the
    text differently (a pruned vocabulary): then it is `dense_equivalent_ratio`, in the dense model's tokens."""
    mine, theirs = row.get("per_byte", {}).get(register), dense.get("per_byte", {}).get(register)
    if mine and theirs and abs(mine[1] - theirs[1]) > 1e-9:
        return dense_equivalent_ratio(mine[0], theirs[0], theirs[1]), True
    return row[register] / dense[register], False


def cell(row: dict, dense: dict, register: str) -> str:
    if register not in row or register not in dense:
        return "-"
    if row is dense:
        return f"{row[register]:.2f}"
    ratio, per_byte = ratio_to_dense(row, dense, register)
    return f"{dense[register] * ratio:.2f} (x{ratio:.2f}){'*' if per_byte else ''}"


def render(out: Path) -> None:
    rows = latest_rows(out / "results.jsonl")
    dense = next(r for r in rows if r["row"] == "dense")
    grid = sorted((r for r in rows if r["row"] != "dense"), key=lambda r: (r["ratio"], list(ROWS).index(r["row"])
                                                                           if r["row"] in ROWS else 99))
    lines = [["dense", 0.0, *(cell(dense, dense, n) for n in REGISTERS), "-"]]
    lines += [[r["row"], round(r["achieved"], 4), *(cell(r, dense, n) for n in REGISTERS),
               f"{r['wall_s']:.0f} / {r['cpu_s']:.0f}"] for r in grid]
    text = table(lines, ["row", "ratio", *REGISTERS, "wall / cpu s"])
    header = ("Perplexity (x dense) on each register's evaluation part, 4096 tokens in 512-token windows; default "
              "calibration. Commands: results.jsonl. *: the row's tokenizer differs (pruned vocabulary), so the "
              "ratio is taken per UTF-8 byte and expressed in the dense model's tokens (dense_equivalent_ratio in "
              "evaluation/perplexity.py), and the perplexity shown is dense x that ratio.")
    (out / "results.md").write_text(header + "\n\n```\n" + text + "\n```\n")
    print(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a line per row measured at three ratios or more (single-ratio experiments stay in the table)
    ratios_of = {label: {r["ratio"] for r in grid if r["row"] == label} for label in dict.fromkeys(r["row"] for r in grid)}
    plotted = [label for label, ratios in ratios_of.items() if len(ratios) >= 3]
    figure, axes = plt.subplots(1, len(REGISTERS), figsize=(4 * len(REGISTERS) + 2, 3.4), sharey=True)
    for axis, register in zip(axes, REGISTERS):
        for index, label in enumerate(plotted):
            points = sorted((r["ratio"], ratio_to_dense(r, dense, register)[0]) for r in grid
                            if r["row"] == label and register in r and register in dense)
            if points:
                axis.plot(*zip(*points), marker="o", label=label, color=f"C{index % 10}",
                          linestyle="-" if index < 10 else "--")
        axis.set_title(register)
        axis.set_xlabel("ratio removed")
        axis.set_yscale("log")
    axes[0].set_ylabel("perplexity / dense")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", fontsize=8)
    figure.tight_layout(rect=(0, 0, 1 - 1.6 / (4 * len(REGISTERS) + 2), 1))
    figure.savefig(out / "perplexity_vs_ratio.png", dpi=120)


def prune_and_score(record: dict, tokens: int = 4096) -> int:
    """For experiment scripts that patch the engine first: prune.py with this process's arguments (which must name
    --out), then the saved folder scored on every register, printed as one JSON line after `record`."""
    from depgraph_llm.cli.commands import prune_main

    sys.argv = ["prune.py", *sys.argv[1:]]
    status = prune_main()
    if status:
        return status
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    print(json.dumps({**record, **evaluate_folder(out, register_texts(), tokens)}))
    return 0


def score(folders: list[Path], out: Path, tokens: int) -> None:
    """Score checkpoints pruned outside the grid (e.g. by an experiment script) on the grid's registers and print
    each one's perplexity and its ratio to the dense row of `out`/results.jsonl (nothing is written)."""
    dense = next((r for r in reversed(latest_rows(out / "results.jsonl")) if r["row"] == "dense"), None)
    if dense is None:
        raise SystemExit(f"no dense row in {out / 'results.jsonl'}; pass --out docs/results/bench-grid (or a grid "
                         "of the same model)")
    texts = register_texts()
    for folder in folders:
        row = evaluate_folder(folder, texts, tokens)
        ratios = {name: round(ratio_to_dense(row, dense, name)[0], 3) for name in texts if name in dense}
        print(json.dumps({"folder": str(folder), "x_dense": ratios, **row}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--rows", default="default,search+cross-block", help=f"comma-separated: {', '.join(ROWS)}")
    parser.add_argument("--model", default=None, help="dense model folder (default: the embedded model)")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-grid"))
    parser.add_argument("--render", action="store_true", help="only rewrite results.md and the plot")
    parser.add_argument("--custom", action="append", default=[], metavar="LABEL=FLAGS",
                        help="an extra row: prune.py flags under a label, e.g. 'hidden-0.4=--hidden-ratio 0.4 "
                             "--reconstruct none' (then name LABEL in --rows)")
    parser.add_argument("--backfill", action="store_true",
                        help="prune again the requested rows that lack a register, and measure them on all")
    parser.add_argument("--score", nargs="+", type=Path, metavar="DIR",
                        help="only score these pruned checkpoints against the dense row of --out (written nowhere)")
    parser.add_argument("--peer-child", nargs=2, metavar=("RATIO", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_child:
        return peer_child(float(args.peer_child[0]), Path(args.peer_child[1]), args.model)
    for custom in args.custom:
        label, _, flags = custom.partition("=")
        if not label or not flags:
            raise SystemExit(f"--custom {custom!r}: expected LABEL=FLAGS")
        ROWS[label] = flags.split()
    if args.score:
        return score(args.score, args.out, args.eval_tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    if args.render:
        return render(args.out)
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    model, tokenizer = load_model(resolve_model_path(args.model))
    texts = register_texts()
    done = latest_rows(results)
    complete = [r for r in done if not args.backfill or all(n in r for n in texts)]
    if not any(r["row"] == "dense" and "per_byte" in r for r in complete):
        with results.open("a") as handle:
            handle.write(json.dumps({"row": "dense", **evaluate(model, tokenizer, texts, args.eval_tokens)}) + "\n")
    del model
    for ratio in (float(r) for r in args.ratios.split(",")):
        for label in args.rows.split(","):
            if any(r["row"] == label and r["ratio"] == ratio for r in complete):
                continue
            with tempfile.TemporaryDirectory(prefix="bench-grid-") as folder:
                row = prune_row(label, ratio, Path(folder) / "out", args.model)
                row.update(evaluate_folder(Path(folder) / "out", texts, args.eval_tokens))
            with results.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    render(args.out)


if __name__ == "__main__":
    try:
        main()
    except UserError as error:  # bad input (e.g. a folder that is not a checkpoint): one line, no traceback
        raise SystemExit(f"error: {error}") from None
