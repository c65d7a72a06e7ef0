#!/usr/bin/env python
"""Side-by-side benchmark: depgraph-llm vs Torch-Pruning on the same model, calibration and evaluation text.

One process, one model loaded fresh from disk per method, the same ratio of parameters removed, no fine-tuning.
Torch-Pruning prunes MLP channels only: its dependency search for attention groups does not finish on
transformers 5 Llama (and its documented head-pruning recipe fails on 9 query / 3 KV heads), so the peer
is the part of Torch-Pruning that works here. Writes JSON + markdown to --out.

    python scripts/bench_torch_pruning.py --ratio 0.25 --out outputs/bench-tp
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from depgraph_llm.calibration import (DEFAULT_CALIBRATION_FILES, DEFAULT_EVAL_FILES, default_files,  # noqa: E402
                                      load_text, token_windows)
from depgraph_llm.loading import load_model, resolve_model_path  # noqa: E402
from depgraph_llm.pipeline import prune_in_memory  # noqa: E402
from depgraph_llm.summary import table  # noqa: E402
from evaluation.memory import PeakRSS  # noqa: E402
from evaluation.perplexity import perplexity  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: embedded SmolLM2-135M)")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-tp"))
    args = parser.parse_args()
    path = resolve_model_path(args.model)
    model, tokenizer = load_model(path)
    calibration = token_windows(tokenizer, load_text(default_files(DEFAULT_CALIBRATION_FILES)), 512, 8, 0)
    eval_text = load_text(default_files(DEFAULT_EVAL_FILES))
    total = sum(p.numel() for p in model.parameters())
    dense = perplexity(model, tokenizer, eval_text).perplexity
    rows = [{"method": "dense", "params": total, "ratio": 0.0, "perplexity": dense, "prune_s": 0.0, "peak_mb": 0.0}]
    del model
    methods = [("depgraph-llm", "taylor"), ("depgraph-llm", "l2"), ("depgraph-llm", "random"),
               ("torch-pruning (MLP only)", "taylor"), ("torch-pruning (MLP only)", "l2")]
    for tool, importance in methods:
        model, _ = load_model(path)
        torch.manual_seed(0)
        with PeakRSS() as memory:
            start = time.perf_counter()
            if tool == "depgraph-llm":
                plan, _ = prune_in_memory(model, importance, calibration, args.ratio, args.round_to)
            else:
                torch_pruning_mlp(model, importance, calibration, args.ratio, args.round_to)
            seconds = time.perf_counter() - start
        params = sum(p.numel() for p in model.parameters())
        layer = model.model.layers[0]
        rows.append({"method": f"{tool} {importance}", "params": params, "ratio": 1 - params / total,
                     "mlp": layer.mlp.gate_proj.out_features, "q_heads": layer.self_attn.q_proj.out_features // 64,
                     "perplexity": perplexity(model, tokenizer, eval_text).perplexity, "prune_s": seconds,
                     "peak_mb": memory.delta_bytes / 2**20})
        print(rows[-1], flush=True)
        del model
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"model": str(path), "ratio": args.ratio, "rows": rows}, indent=1))
    header = ["method", "params", "ratio removed", "MLP width", "q heads", "perplexity", "x dense", "prune time s",
              "peak extra RSS MiB"]
    body = [[r["method"], f"{r['params'] / 1e6:.2f}M", f"{r['ratio']:.3f}", r.get("mlp", "-"), r.get("q_heads", "-"),
             f"{r['perplexity']:.2f}", f"{r['perplexity'] / dense:.2f}", f"{r['prune_s']:.1f}", f"{r['peak_mb']:.0f}"]
            for r in rows]
    markdown = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    markdown += "".join("| " + " | ".join(str(c) for c in row) + " |\n" for row in body)
    (args.out / "results.md").write_text(markdown)
    print(table(body, header))


if __name__ == "__main__":
    main()
