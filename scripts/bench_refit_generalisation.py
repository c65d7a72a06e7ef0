#!/usr/bin/env python
"""Does a layer's refit generalise off the calibration register? One projection at a time, on the dense model's
own inputs: OBS removes a fraction of its input channels (chosen on the calibration windows), then the kept
weights are refitted by damped least squares toward zero (today's `--reconstruct-anchor 0`) or toward the
original weights at several anchors. Each fit's output error against the dense projection is measured per token
on the calibration windows and on the evaluation parts of registers never calibrated on.

    OMP_NUM_THREADS=1 python scripts/bench_refit_generalisation.py --layers 3,5,11,20,27 --keep 0.5 \
        --anchors 0,0.1,0.3,1,3 --out docs/results/refit-generalisation

Only the named layers' inputs are kept (float64, about 200 MB a layer for the default model and windows), so it
runs in a few minutes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from depgraph_llm.calibration import DEFAULT_CALIBRATION_SAMPLES  # noqa: E402
from depgraph_llm.calibration.corpora import corpus_part  # noqa: E402
from depgraph_llm.calibration.record import calibration_record  # noqa: E402
from depgraph_llm.calibration.sources import default_calibration_source  # noqa: E402
from depgraph_llm.checkpoint.loading import load_model, resolve_model_path  # noqa: E402
from depgraph_llm.recovery.solvers import anchored_least_squares, kept_block, obs_select, ridge  # noqa: E402

HELD_OUT = ("fortunes", "novels", "jargon")
DAMP = 0.01  # the reconstruction's damping (recovery/reconstruct.py)


def per_token_error(weight: torch.Tensor, refit: torch.Tensor, inputs: torch.Tensor) -> float:
    """Mean over tokens of ||x (W' - W)^T||^2 / ||x W^T||^2."""
    dense = inputs @ weight.T
    delta = inputs @ (refit - weight).T
    return float((delta.pow(2).sum(1) / dense.pow(2).sum(1).clamp_min(1e-30)).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="dense model folder (default: the embedded model)")
    parser.add_argument("--layers", default="3,5,11,20,27")
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of down_proj's input channels kept")
    parser.add_argument("--anchors", default="0,0.1,0.3,1,3")
    parser.add_argument("--windows", type=int, default=DEFAULT_CALIBRATION_SAMPLES)
    parser.add_argument("--held-out-windows", type=int, default=3, help="per held-out register")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(resolve_model_path(args.model), False)
    model.eval()
    layers = [int(v) for v in args.layers.split(",")]
    anchors = [float(v) for v in args.anchors.split(",")]
    source = default_calibration_source()
    calibration = source.windows(model, tokenizer, args.seq_len, args.windows, 0)
    held = {}
    for name in HELD_OUT:
        ids = tokenizer(corpus_part(name, "evaluation").text, return_tensors="pt").input_ids[0]
        count = min(args.held_out_windows, len(ids) // args.seq_len)
        held[name] = list(ids[:count * args.seq_len].view(count, args.seq_len))
    inputs: dict[tuple[int, str], list[torch.Tensor]] = {}
    target = {"kind": "calibration"}

    def hook(layer: int):
        def record(module, given):
            inputs.setdefault((layer, target["kind"]), []).append(given[0].reshape(-1, given[0].shape[-1]).double())
        return record

    handles = [model.model.layers[i].mlp.down_proj.register_forward_pre_hook(hook(i)) for i in layers]
    started = time.time()
    with torch.no_grad():
        for window in calibration:
            model(window.view(1, -1))
        for name, windows in held.items():
            target["kind"] = name
            for window in windows:
                model(window.view(1, -1))
    for h in handles:
        h.remove()
    rows = []
    for i in layers:
        weight = model.model.layers[i].mlp.down_proj.weight.detach().double()
        seen = torch.cat(inputs.pop((i, "calibration")))
        gram = seen.T @ seen
        units = [torch.tensor([c]) for c in range(gram.shape[0])]
        removed = set(obs_select(weight, gram, units, gram.shape[0] - int(args.keep * gram.shape[0]), DAMP))
        kept = torch.tensor([c for c in range(gram.shape[0]) if c not in removed])
        gram_kept, cross = kept_block(gram, kept), (gram @ weight.T)[kept]
        fits = {"none": weight[:, kept]}
        fits.update({f"anchor {a:g}": anchored_least_squares(gram_kept, cross, weight[:, kept], ridge(gram, DAMP), a)
                     for a in anchors})
        for label, fit in fits.items():
            refit = torch.zeros_like(weight)
            refit[:, kept] = fit
            row = {"layer": i, "fit": label, "calibration": per_token_error(weight, refit, seen)}
            row.update({name: per_token_error(weight, refit, torch.cat(inputs[(i, name)])) for name in held})
            rows.append(row)
            print(f"layer {i:2d}  {label:11s}  calibration {row['calibration']:.4f}  "
                  + "  ".join(f"{name} {row[name]:.4f}" for name in held), flush=True)
    record = {"model": str(resolve_model_path(args.model)), "keep": args.keep, "windows": len(calibration),
              "calibration_tokens": sum(w.numel() for w in calibration),
              "calibration": calibration_record(source, calibration, args.seq_len, 0), "held_out": list(held),
              "seconds": round(time.time() - started, 1), "rows": rows}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "results.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
