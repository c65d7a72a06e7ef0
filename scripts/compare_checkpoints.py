#!/usr/bin/env python
"""Compare two pruned checkpoints of the same model, e.g. one pruned in memory and one streamed through a GPU, or
one pruned on a CPU and one on a GPU: did they keep the same units, and how far apart are their weights?

    python scripts/compare_checkpoints.py A_DIR B_DIR [--json OUT.json]

Reads only `prune_plan.json` and the safetensors files, so it needs neither model code nor a GPU.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def kept_units(plan: dict) -> dict[str, list]:
    """Every kept-index table of a plan (`keep`, `keep_heads`, ...), flattened to group name -> indices."""
    return {f"{field}:{name}": kept for field, value in plan.items() if field.startswith("keep")
            and isinstance(value, dict) for name, kept in value.items()}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def compare(a: Path, b: Path) -> dict:
    """Kept units that differ, tensors missing on either side or shaped differently, and per-tensor relative error
    |a - b|_max / |a|_max of the rest (the worst ten listed)."""
    plan_a, plan_b = (json.loads((p / "prune_plan.json").read_text()) for p in (a, b))
    kept_a, kept_b = kept_units(plan_a), kept_units(plan_b)
    differing = {name: {"only_a": sorted(set(kept_a.get(name, [])) - set(kept_b.get(name, []))),
                        "only_b": sorted(set(kept_b.get(name, [])) - set(kept_a.get(name, [])))}
                 for name in sorted(set(kept_a) | set(kept_b)) if kept_a.get(name) != kept_b.get(name)}
    wa, wb = weights(a), weights(b)
    shapes = {k: [list(wa[k].shape), list(wb[k].shape)] for k in set(wa) & set(wb) if wa[k].shape != wb[k].shape}
    errors = {k: float((wa[k].float() - wb[k].float()).abs().max() / wa[k].float().abs().max().clamp_min(1e-30))
              for k in sorted(set(wa) & set(wb)) if k not in shapes}
    worst = sorted(errors.items(), key=lambda item: -item[1])[:10]
    return {"a": str(a), "b": str(b), "kept_tables": len(kept_a), "kept_tables_differing": len(differing),
            "differing": differing, "only_in_a": sorted(set(wa) - set(wb)), "only_in_b": sorted(set(wb) - set(wa)),
            "shape_mismatch": shapes, "max_relative_error": max(errors.values(), default=0.0),
            "worst_tensors": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--json", type=Path, help="also write the full comparison here")
    args = parser.parse_args()
    for folder in (args.a, args.b):
        if not (folder / "prune_plan.json").is_file() or not any(folder.glob("*.safetensors")):
            raise SystemExit(f"error: {folder} is not a pruned checkpoint (no prune_plan.json or *.safetensors); "
                             "pass two prune.py output folders")
    result = compare(args.a, args.b)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    summary = {k: result[k] for k in ("kept_tables", "kept_tables_differing", "only_in_a", "only_in_b",
                                       "shape_mismatch", "max_relative_error")}
    print(json.dumps(summary))
    print("worst tensors:", ", ".join(f"{k} {v:.2e}" for k, v in result["worst_tensors"][:5]))


if __name__ == "__main__":
    main()
