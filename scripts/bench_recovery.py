#!/usr/bin/env python
"""Benchmark of training-based recovery on the default model (issue 15's table).

For each ratio and row (none, lora, lora+distill, masked, full) it trains once for max(--eval-at) steps and
measures perplexity on held-out text of several registers at each step of --eval-at (same run). The recovery
text is the `training` part of --train-registers (depgraph_llm.calibration.corpora, when present) or the default recovery
licences; evaluation uses the `evaluation` parts, which are in neither calibration nor recovery text.

One (ratio, row) per process is the intended use (peak memory is then per row); results are appended to
OUT/results.jsonl as they come and OUT/results.md is rebuilt from it:

    OMP_NUM_THREADS=1 python scripts/bench_recovery.py --ratio 0.5 --row lora+distill --eval-at 25,100
    python scripts/bench_recovery.py --table-only
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OLD_DEFAULT_RECIPE = "default of 2026-12-01"
ROWS = {"none": None, "lora": ("lora", False), "lora+distill": ("lora", True), "masked": ("masked", False),
        "full": ("full", False), "masked+distill": ("masked", True)}


def texts(args) -> tuple[dict[str, str], str, list[str]]:
    """Evaluation text per register, the recovery text, and the recovery files/parts (for the record)."""
    from depgraph_llm.calibration.sources import DEFAULT_EVAL_FILES, default_files, load_text
    from depgraph_llm.recovery.data import fallback_recovery_files

    evaluation = {"licences": load_text(default_files(DEFAULT_EVAL_FILES))}
    try:
        from depgraph_llm.calibration import corpora
    except ImportError:
        corpora = None
    if corpora is None:
        return evaluation, load_text(fallback_recovery_files()), [str(f) for f in fallback_recovery_files()]
    for name in args.eval_registers.split(","):
        if name != "licences" and corpora.is_available(name):
            evaluation[name] = corpora.corpus_part(name, "evaluation").text
    parts = [corpora.corpus_part(n, "training") for n in args.train_registers.split(",") if corpora.is_available(n)]
    per_part = args.train_chars // max(1, len(parts))
    text = "\n\n".join(p.text[:per_part] for p in parts)  # an equal share of each register
    return evaluation, text, [f"{p.register}:training[:{per_part} chars] sha256={p.sha256[:12]}" for p in parts]


def evaluate(model, tokenizer, evaluation: dict[str, str], args) -> dict[str, float]:
    from depgraph_llm.evaluation.perplexity import perplexity

    was_training = model.training
    model.eval()
    result = {name: round(perplexity(model, tokenizer, text, args.eval_seq_len, args.eval_tokens, False).perplexity, 3)
              for name, text in evaluation.items()}
    model.train(was_training)
    return result


def append(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    write_table(out)


def slim_recipe(record: dict) -> str:
    """prune.py flags of the slim model a row trained from ("default": the default recipe when the row ran).
    Rows from before the field trained from the default of 2026-12-01 (8 windows, plain refit and an older
    calibration mix), which today's flags do not reproduce."""
    return record.get("slim_recipe", OLD_DEFAULT_RECIPE)


def write_table(out: Path) -> None:
    lines_in = (out / "results.jsonl").read_text().splitlines()
    records = merged([json.loads(line) for line in lines_in if line.strip()])
    registers = sorted({r for rec in records for r in rec["perplexity"]}, key=lambda r: (r != "licences", r))
    dense = {rec["ratio"]: rec for rec in records if rec["row"] == "dense"}
    dense_any = next(iter(dense.values()), None)
    header = ["ratio", "slim recipe", "row", "steps", "tokens seen", *[f"ppl {r}" for r in registers],
              "x dense (licences)", "train s", "peak RSS GiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = {"dense": 0, "none": 1}
    for rec in sorted(records, key=lambda r: (r["ratio"], slim_recipe(r), order.get(r["row"], 2), r["row"],
                                              r.get("steps", 0))):
        ppl = rec["perplexity"]
        ratio_dense = (dense_any or {}).get("perplexity", {}).get("licences")
        lines.append("| " + " | ".join([
            str(rec["ratio"]), "-" if rec["row"] == "dense" else slim_recipe(rec), rec["row"],
            str(rec.get("steps", 0)), f"{rec.get('tokens', 0):,}",
            *[f"{ppl[r]:.2f}" if r in ppl else "-" for r in registers],
            f"{ppl['licences'] / ratio_dense:.2f}" if ratio_dense and "licences" in ppl else "-",
            f"{rec['train_s']:.0f}" if "train_s" in rec else "-",
            f"{rec['peak_rss_bytes'] / 2**30:.2f}" if "peak_rss_bytes" in rec else "-"]) + " |")
    settings = records[-1].get("settings", {}) if records else {}
    (out / "results.md").write_text("\n".join(lines) + "\n\nSettings: " + json.dumps(settings) + "\n")


def slim_checkpoint(ratio: float, work: Path, prune_flags: str) -> Path:
    """The slim model every row of one (ratio, recipe) trains from, pruned once by `prune.py` in a fresh process."""
    key = hashlib.sha256(prune_flags.encode()).hexdigest()[:8] if prune_flags else ""
    folder = work / (f"slim-{ratio:g}-{key}" if key else f"slim-{ratio:g}")
    if not (folder / "prune_report.json").is_file():
        command = [sys.executable, str(ROOT / "prune.py"), "--ratio", str(ratio), "--out", str(folder), "--no-eval",
                   "--overwrite", *shlex.split(prune_flags)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return folder


def final_eval(args) -> int:
    """Evaluate the slim model and each recovered checkpoint of (ratio, recipe) on more registers afterwards."""
    from depgraph_llm.calibration import corpora
    from depgraph_llm.checkpoint.loading import default_model_dir, load_model

    evaluation = {name: corpora.corpus_part(name, "evaluation").text for name in args.final_eval.split(",")}
    model, tokenizer = load_model(default_model_dir())
    append(args.out, {"ratio": 0.0, "row": "dense", "steps": 0, "final_eval": True,
                      "perplexity": evaluate(model, tokenizer, evaluation, args)})
    slim = slim_checkpoint(args.ratio, args.work, args.prune_flags)
    base = {"ratio": args.ratio, "slim_recipe": args.prune_flags or "default", "final_eval": True}
    for row in ["none", *ROWS]:
        folder = slim if row == "none" else args.work / f"recovered-{slim.name}-{row}"
        if not (folder / "config.json").is_file():
            continue
        report = json.loads((folder / "prune_report.json").read_text()) if row != "none" else {}
        steps = report.get("recovery", {}).get("steps", 0)
        model, tokenizer = load_model(folder)
        append(args.out, {**base, "row": row, "steps": steps, "perplexity": evaluate(model, tokenizer, evaluation,
                                                                                      args)})
    return 0


def merged(records: list[dict]) -> list[dict]:
    """Records with each --final-eval record folded into the last earlier record of the same run end."""
    out: list[dict] = []
    for rec in records:
        if not rec.get("final_eval"):
            out.append(dict(rec, perplexity=dict(rec["perplexity"])))
            continue
        key = (rec["ratio"], slim_recipe(rec), rec["row"], rec.get("steps", 0))
        target = next((r for r in reversed(out) if (r["ratio"], slim_recipe(r), r["row"], r.get("steps", 0)) == key),
                      None)
        if target is not None:
            target["perplexity"].update(rec["perplexity"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--row", default="lora+distill", help=", ".join(["dense", *ROWS]))
    parser.add_argument("--eval-at", default="100,400", help="steps at which to evaluate (the run goes to the last)")
    parser.add_argument("--lr", type=float, help="default: 2e-4 for lora, 5e-5 for masked/full")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-registers", default="licences,python-docs,fortunes")
    parser.add_argument("--train-registers", default="licences,python-docs,wordnet,jargon")
    parser.add_argument("--train-chars", type=int, default=400_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-recovery"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "bench-recovery")
    parser.add_argument("--prune-flags", default="", help="prune.py flags for the slim model on top of --ratio "
                        "(default: none, the default recipe); recorded with every row as its slim recipe")
    parser.add_argument("--final-eval", metavar="REGISTERS", help="only evaluate the finished checkpoints of "
                        "--ratio / --prune-flags (the slim model and every row's recovered model) on more "
                        "registers, e.g. novels; merged into the table row of each run's last step")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.table_only:
        write_table(args.out)
        print((args.out / "results.md").read_text())
        return 0
    from depgraph_llm.checkpoint.loading import default_model_dir, load_model
    from depgraph_llm.job.recover import RecoverOptions, run_recover

    if args.final_eval:
        return final_eval(args)
    evaluation, train_text, train_parts = texts(args)
    args.work.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("work", "out", "table_only", "ratio", "row",
                                                                 "prune_flags")}
    settings.update(recovery_text=train_parts, threads=torch.get_num_threads())
    base = {"ratio": args.ratio, "row": args.row, "slim_recipe": args.prune_flags or "default", "settings": settings}
    if args.row == "dense":
        model, tokenizer = load_model(default_model_dir())
        append(args.out, {**base, "ratio": 0.0, "perplexity": evaluate(model, tokenizer, evaluation, args)})
        return 0
    slim = slim_checkpoint(args.ratio, args.work, args.prune_flags)
    if args.row == "none":
        model, tokenizer = load_model(slim)
        append(args.out, {**base, "perplexity": evaluate(model, tokenizer, evaluation, args),
                          "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
        return 0
    trainer, distill = ROWS[args.row]
    data_file = args.work / "recovery-text.txt"
    data_file.write_text(train_text)
    _, tokenizer = load_model(slim)
    eval_at = sorted(int(s) for s in args.eval_at.split(","))
    timing = {"eval_s": 0.0, "began": time.perf_counter()}

    def on_step(info) -> None:
        print(f"step {info.step}/{info.steps} loss {info.loss:.4f} {info.tokens_per_s:.0f} tok/s", flush=True)
        if info.step in eval_at:
            began = time.perf_counter()
            ppl = evaluate(info.model, tokenizer, evaluation, args)
            timing["eval_s"] += time.perf_counter() - began
            append(args.out, {**base, "steps": info.step, "tokens": info.tokens, "perplexity": ppl, "loss": info.loss,
                              "train_s": round(time.perf_counter() - timing["began"] - timing["eval_s"], 1),
                              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})

    lr = args.lr or (2e-4 if trainer == "lora" else 5e-5)
    out = args.work / f"recovered-{slim.name}-{args.row}"
    run_recover(RecoverOptions(slim=slim, out=out, trainer=trainer, data=str(data_file),
                               teacher="dense" if distill else None, steps=eval_at[-1], lr=lr,
                               batch_size=args.batch_size, seq_len=args.seq_len, evaluate=False, overwrite=True,
                               resume=True, checkpoint_every=25), on_step=on_step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
