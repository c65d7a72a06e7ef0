"""`depgraph-llm info DIR`: per-layer widths, parameter count and provenance of a checkpoint, without loading it."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from depgraph_llm.models import spec_for
from depgraph_llm.checkpoint.files import corrupt_weights_error, read_checkpoint_config
from depgraph_llm.removal.slim_config import base_model_type, saved_per_layer_widths
from depgraph_llm.cli.summary import table


def checkpoint_params(folder: Path) -> int:
    """Parameters stored in the folder's safetensors files (tied tensors are stored once)."""
    total = 0
    try:
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    total += _numel(handle.get_slice(name).get_shape())
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise corrupt_weights_error(folder, exc) from exc
    return total


def _numel(shape: list[int]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


def layer_rows(config: dict) -> list[dict]:
    """Per-layer widths from config.json (global values overridden by the per-layer map)."""
    spec = spec_for(base_model_type(config.get("model_type", "")))
    fields = {"mlp": spec.mlp_width_field, "q_heads": spec.q_heads_field, "kv_heads": spec.kv_heads_field}
    overrides = {int(k): v for k, v in saved_per_layer_widths(config).items()}
    rows = []
    for index in range(config.get(spec.layers_field, 0)):
        layer = {**config, **overrides.get(index, {})}
        rows.append({"layer": index, **{k: layer.get(f) for k, f in fields.items() if f}})
    return rows


def describe(folder: Path) -> str:
    """The text `depgraph-llm info` prints."""
    config = read_checkpoint_config(folder)
    rows = layer_rows(config)
    layout = "heterogeneous per-layer widths" if saved_per_layer_widths(config) else "uniform"
    overrides = config.get("module_overrides") or {}
    if overrides:  # widths the config fields cannot state (e.g. GPT-2 heads): the weights' shapes are the truth
        layout += (f", {len(overrides.get('parameters', {}))} parameter shapes in module_overrides; widths below "
                   "are the config fields'")
    hidden_field = spec_for(base_model_type(config.get("model_type", ""))).hidden_field
    lines = [f"{folder}: {config.get('model_type')} ({layout}), {len(rows)} layers, hidden {config.get(hidden_field)}, vocab {config.get('vocab_size')}, "
             f"{checkpoint_params(folder) / 1e6:.2f}M parameters"]
    lines.append(table([[r["layer"], r.get("mlp"), r.get("q_heads"), r.get("kv_heads")] for r in rows],
                       ["layer", "MLP width", "query heads", "KV heads"]))
    report_path = folder / "prune_report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        ppl = report.get("perplexity") or {}
        before, after = (ppl.get(k) or {} for k in ("before", "after"))
        source = report.get("source") or {}
        lines.append(f"made by depgraph-llm {(report.get('tool') or {}).get('version')} from {source.get('path')} "
                     f"(sha256 {str(source.get('weights_sha256'))[:12]}...): importance {report.get('importance')}, "
                     f"schedule {report.get('schedule')}, reconstruct {report.get('reconstruct', 'none')}, "
                     f"removed {report.get('ratio_achieved')} of {report.get('params_before')} parameters")
        if before.get("perplexity") and after.get("perplexity"):
            lines.append(f"perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f}")
    else:
        lines.append("no prune_report.json: not written by depgraph-llm (or copied without it)")
    return "\n".join(lines)
