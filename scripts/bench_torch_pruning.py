#!/usr/bin/env python
"""Side-by-side benchmark: depgraph-llm vs Torch-Pruning on the same model, calibration and evaluation text.

Every method runs in a fresh child process (so peak memory is the child's own high-water mark, not memory
another method left in the allocator), loads the model from disk, removes the same ratio of parameters
and gets no fine-tuning.
Torch-Pruning prunes MLP channels only: its dependency search for attention groups does not finish on
transformers 5 Llama (and its documented head-pruning recipe fails on 9 query / 3 KV heads), so the peer
is the part of Torch-Pruning that works here. Writes JSON + markdown to --out.

    python scripts/bench_torch_pruning.py --ratio 0.25 --out outputs/bench-tp
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from depgraph_llm.calibration.sources import (DEFAULT_CALIBRATION_FILES, DEFAULT_EVAL_FILES, default_files,  # noqa: E402
                                      load_text, token_windows)
from depgraph_llm.checkpoint.loading import load_model, resolve_model_path  # noqa: E402
from depgraph_llm.job.options import PruneOptions
from depgraph_llm.job.in_memory import prune_in_memory  # noqa: E402
from depgraph_llm.cli.summary import table  # noqa: E402
from depgraph_llm.evaluation.perplexity import perplexity  # noqa: E402


def torch_pruning_mlp(model, importance: str, calibration, ratio: float, round_to: int) -> None:
    """Prune MLP channels with Torch-Pruning's MetaPruner so that `ratio` of all parameters go."""
    import torch_pruning as tp

    total = sum(p.numel() for p in model.parameters())
    mlp_params = sum(p.numel() for layer in model.model.layers for p in layer.mlp.parameters())
    channel_ratio = min(0.99, ratio * total / mlp_params)
    norms = [m.weight for n, m in model.named_modules() if n.endswith("norm")]
    keep_whole = [model.lm_head, model.model.embed_tokens]
    keep_whole += [m for n, m in model.named_modules() if "self_attn" in n and isinstance(m, torch.nn.Linear)]
    keep_whole += [layer.mlp.down_proj for layer in model.model.layers]
    scorer = {"l2": tp.importance.GroupMagnitudeImportance(p=2), "taylor": tp.importance.GroupTaylorImportance()}[importance]
    if importance == "taylor":
        model.zero_grad()
        for ids in calibration:
            (model(input_ids=ids, labels=ids).loss / len(calibration)).backward()
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=calibration[0][:, :16], importance=scorer, pruning_ratio=channel_ratio,
        ignored_layers=keep_whole, round_to=round_to, forward_fn=lambda m, x: m(x).logits,
        unwrapped_parameters=[(w, 0) for w in norms])
    pruner.step()
    model.zero_grad(set_to_none=True)
    model.config.intermediate_size = model.model.layers[0].mlp.gate_proj.out_features


def run_one(method: str, args: argparse.Namespace) -> dict:
    """Prune with one method in this process and measure it."""
    import resource

    tool, importance = method.split(":")
    path = resolve_model_path(args.model)
    model, tokenizer = load_model(path)
    calibration = token_windows(tokenizer, load_text(default_files(DEFAULT_CALIBRATION_FILES)), 512, 8, 0)
    eval_text = load_text(default_files(DEFAULT_EVAL_FILES))
    total = sum(p.numel() for p in model.parameters())
    if tool == "dense":
        return {"method": "dense", "params": total, "ratio": 0.0, "prune_s": 0.0,
                "perplexity": perplexity(model, tokenizer, eval_text).perplexity,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    torch.manual_seed(0)
    start = time.perf_counter()
    if tool == "depgraph-llm":
        prune_in_memory(model, calibration, PruneOptions(importance=importance, ratio=args.ratio, round_to=args.round_to,
                                                         reconstruct="none", show_progress=False))
    else:
        torch_pruning_mlp(model, importance, calibration, args.ratio, args.round_to)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in model.parameters())
    layer = model.model.layers[0]
    return {"method": f"{tool} {importance}", "params": params, "ratio": 1 - params / total,
            "mlp": layer.mlp.gate_proj.out_features,
            "q_heads": layer.self_attn.q_proj.out_features // layer.self_attn.head_dim,
            "perplexity": perplexity(model, tokenizer, eval_text).perplexity, "prune_s": seconds, "peak_rss_mb": peak}


METHODS = ["dense:-", "depgraph-llm:taylor", "depgraph-llm:l2", "depgraph-llm:random",
           "torch-pruning:taylor", "torch-pruning:l2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: embedded SmolLM2-135M)")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-tp"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode: run one method, print JSON
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)), flush=True)
        return
    rows = []
    for method in METHODS:
        command = [sys.executable, __file__, "--one", method, "--ratio", str(args.ratio), "--round-to", str(args.round_to)]
        if args.model:
            command += ["--model", args.model]
        child = subprocess.run(command, capture_output=True, text=True)
        lines = [l for l in child.stdout.splitlines() if l.startswith("RESULT ")]
        if child.returncode != 0 or not lines:
            raise SystemExit(f"{method} failed:\n{child.stderr[-2000:]}")
        rows.append(json.loads(lines[-1][len("RESULT "):]))
        print(rows[-1], flush=True)
    dense = rows[0]["perplexity"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"model": str(resolve_model_path(args.model)),
                                                       "ratio": args.ratio, "rows": rows}, indent=1))
    header = ["method", "params", "ratio removed", "MLP width", "q heads", "perplexity", "x dense", "prune time s",
              "peak RSS MiB"]
    body = [[r["method"], f"{r['params'] / 1e6:.2f}M", f"{r['ratio']:.3f}", r.get("mlp", "-"), r.get("q_heads", "-"),
             f"{r['perplexity']:.2f}", f"{r['perplexity'] / dense:.2f}", f"{r['prune_s']:.1f}", f"{r['peak_rss_mb']:.0f}"]
            for r in rows]
    markdown = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    markdown += "".join("| " + " | ".join(str(c) for c in row) + " |\n" for row in body)
    (args.out / "results.md").write_text(markdown)
    print(table(body, header))


if __name__ == "__main__":
    main()
