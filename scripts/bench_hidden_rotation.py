#!/usr/bin/env python
"""Hidden-dimension pruning by rotation against channel selection: at one total ratio and one --hidden-ratio, the
default recipe without hidden pruning, hidden channels selected (reconstruction refused there), and the PCA
rotation without and with the default reconstruction; same model, calibration windows and seed for every row,
perplexity on the three registers of scripts/bench_reconstruction.py.

    OMP_NUM_THREADS=1 python scripts/bench_hidden_rotation.py --out docs/results/bench-hidden-rotation
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_reconstruction import REGISTERS, evaluate  # noqa: E402  (scripts/ is on sys.path when run as a script)
from depgraph_llm.job import in_memory  # noqa: E402
from depgraph_llm.job.options import PruneOptions  # noqa: E402
from depgraph_llm.job.inputs import calibration_batches  # noqa: E402
from depgraph_llm.calibration.sources import default_calibration_source  # noqa: E402
from depgraph_llm.checkpoint.loading import load_model, resolve_model_path  # noqa: E402
from depgraph_llm.calibration.corpora import available_registers, corpus_part  # noqa: E402
from depgraph_llm.recovery import rotation  # noqa: E402
from depgraph_llm.cli.summary import table  # noqa: E402

VARIANTS = {  # row -> PruneOptions fields on top of --ratio (hidden ones get --hidden-ratio)
    "default-no-hidden": dict(),
    "select-none": dict(hidden_method="select", reconstruct="none"),
    "rotate-none": dict(hidden_method="rotate", reconstruct="none"),
    "rotate-obs": dict(hidden_method="rotate"),
    "rotate-raw-pca-none": dict(hidden_method="rotate", reconstruct="none"),  # PCA of the un-normalised stream
}


def raw_gram(states: torch.Tensor) -> torch.Tensor:
    """The alternative PCA: sum of x x^T over tokens, without scaling each token to unit length."""
    x = states.reshape(-1, states.shape[-1]).double()
    return x.T @ x


def hidden_only_ratio(model, hidden_ratio: float, untied: bool, round_to: int = 8) -> float:
    """The total ratio that cutting only the hidden size removes (k rounded as the planner does), from a stock
    config built on meta; the rotation's untied head counts."""
    config = copy.deepcopy(model.config)
    step = math.lcm(round_to, config.num_attention_heads)
    config.hidden_size = max(step, step * round(config.hidden_size * (1 - hidden_ratio) / step))
    config.tie_word_embeddings = config.tie_word_embeddings and not untied
    with torch.device("meta"):
        slim = AutoModelForCausalLM.from_config(config)
    return 1 - sum(p.numel() for p in slim.parameters()) / sum(p.numel() for p in model.parameters())


def widths(model) -> str:
    """hidden / MLP / query heads of the pruned model, from its config."""
    c = model.config
    return f"{c.hidden_size}/{c.intermediate_size}/{c.num_attention_heads}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--hidden-ratio", type=float, default=0.2)
    parser.add_argument("--rows", default=",".join(VARIANTS), help="comma-separated row names")
    parser.add_argument("--hidden-only", action="store_true", help="cut only the hidden size (no MLP channels or "
                        "heads): each row's --ratio is what that alone removes")
    parser.add_argument("--importance", default="taylor", help="estimator for every row (irrelevant to the "
                        "rotation rows with --hidden-only, where nothing is chosen by score)")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-hidden-rotation"))
    args = parser.parse_args()
    normalised_gram = rotation.normalised_gram
    model, tokenizer = load_model(resolve_model_path(args.model))
    texts = {r: corpus_part(r, "evaluation").text for r in available_registers(REGISTERS)}
    options = PruneOptions(model=args.model or "", ratio=args.ratio, show_progress=False)
    source = default_calibration_source()
    calibration = calibration_batches(model, tokenizer, source, options)
    rows = [{"row": "dense", "ratio": 0.0, "widths": widths(model), **evaluate(model, tokenizer, texts, args.eval_tokens)}]
    print(json.dumps(rows[-1]), flush=True)
    for label in args.rows.split(","):
        fields = dict(VARIANTS[label])
        ratio = args.ratio
        if "hidden_method" in fields:
            fields["hidden_ratio"] = args.hidden_ratio
            if args.hidden_only:
                fields.update(mlp_ratio=0.0, head_ratio=0.0)
                ratio = hidden_only_ratio(model, args.hidden_ratio, fields["hidden_method"] == "rotate")
        rotation.normalised_gram = raw_gram if label == "rotate-raw-pca-none" else normalised_gram
        pruned = copy.deepcopy(model)
        torch.manual_seed(0)
        began = time.perf_counter()
        plan, _ = in_memory.prune_in_memory(pruned, calibration, PruneOptions(
            model=options.model, ratio=ratio, importance=args.importance, show_progress=False, **fields))
        rows.append({"row": label, "ratio": round(ratio, 4), "achieved": round(plan.ratio_achieved, 4),
                     "widths": widths(pruned), "prune_s": round(time.perf_counter() - began, 1),
                     "explained": plan.rotation_report.get("explained"),
                     **evaluate(pruned, tokenizer, texts, args.eval_tokens)})
        print(json.dumps(rows[-1]), flush=True)
        del pruned
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"calibration": source.record(options.seq_len, len(calibration), options.seed), "rows": rows,
              "command": "OMP_NUM_THREADS=1 python scripts/bench_hidden_rotation.py " + " ".join(sys.argv[1:])}
    (args.out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    dense = rows[0]
    lines = [[r["row"], r["ratio"], r["widths"], *(f"{r[n]:.2f} (x{r[n] / dense[n]:.2f})" for n in texts)]
             for r in rows]
    text = table(lines, ["row", "ratio", "hidden/mlp/heads", *texts])
    (args.out / "results.md").write_text("```\n" + text + "\n```\n")
    print(text)


if __name__ == "__main__":
    main()
