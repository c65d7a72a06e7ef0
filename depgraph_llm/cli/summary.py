"""Plain-text tables for the terminal: the prune summary and the coupling groups."""
from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

from depgraph_llm.graph.coupling import CouplingGraph
from depgraph_llm.graph.groups import GroupKind

TERMINAL_COLUMNS = (60, 100)  # summary tables fit the terminal, never narrower than 60 or wider than 100


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def terminal_width() -> int:
    """The terminal's width, clamped to TERMINAL_COLUMNS (80 columns are assumed when it is not a terminal)."""
    low, high = TERMINAL_COLUMNS
    return max(low, min(high, shutil.get_terminal_size((80, 24)).columns))


def key_value_table(rows: list[list[str]], header: list[str], width: int | None = None) -> str:
    """A two-column table whose values wrap (on spaces and commas, long paths cut) to fit `width` columns."""
    width = width or terminal_width()
    key_width = max(len(str(c)) for c in [header[0], *(r[0] for r in rows)])
    value_width = max(20, width - key_width - 2)
    lines = []
    for key, value in rows:
        wrapped = textwrap.wrap(str(value), value_width, break_on_hyphens=False) or [""]
        lines.extend([[key, wrapped[0]], *([["", more] for more in wrapped[1:]])])
    return table(lines, header)


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _span(widths: list[dict], key: str) -> str:
    """One width, or "first..last (min-max)" when the layers differ."""
    values = [row[key] for row in widths if key in row]
    if len(set(values)) <= 1:
        return str(values[0]) if values else "-"
    return f"{values[0]}..{values[-1]} per layer ({min(values)}-{max(values)})"


def _reconstruction(report: dict) -> str:
    method = report.get("reconstruct", "none")
    detail = report.get("reconstruct_report") or {}
    if method == "none" or not detail:
        return method
    anchor = report.get("reconstruct_anchor") or 0
    text = (f"{method}{f', anchor {anchor:g}' if anchor else ''}: {detail['consumers']} projections refitted, "
            f"relative output error "
            f"{detail['relative_error_before']:.3f} -> {detail['relative_error_after']:.3f} on calibration data")
    if "cross_block" in detail:
        text += f", cross-block refit of {detail['cross_block']['window']} layers at a time"
    calibration, heldout = (detail.get(k, {}).get("mean") for k in ("error_calibration", "error_heldout"))
    if calibration is not None:
        text += f"; block-output error {calibration:.4f} (calibration)"
        text += f" / {heldout:.4f} (held-out)" if heldout is not None else ""
    return text


def prune_summary(report: dict, out: Path) -> str:
    """The table printed at the end of a prune run."""
    rows = [
        ["model", report["source"]["path"]],
        ["importance / schedule", f"{report['importance']} / {report['schedule']}"],
        *([["units chosen by", ", ".join(f"{k}: {v}" for k, v in report["chosen_by"].items())]]
          if set((report.get("chosen_by") or {}).values()) - {report["importance"]} else []),
        ["reconstruction", _reconstruction(report)],
        *([["mode", "dry run: nothing was written"]] if report.get("dry_run") else []),
        ["parameters", f"{_fmt_params(report['params_before'])} -> {_fmt_params(report['params_after'])}"],
        ["ratio requested / achieved", f"{report['ratio_requested']:.3f} / {report['ratio_achieved']:.3f}"],
        *([["active parameters per token", f"{_fmt_params(report['active_params_before'])} -> "
            f"{_fmt_params(report['active_params_after'])} (ratio {report['active_ratio_achieved']:.3f})"]]
          if "active_params_before" in report else []),
    ]
    before, after = report["layer_widths_before"], report["layer_widths_after"]
    if before and len(before) != len(after):
        rows.append(["decoder layers", f"{len(before)} -> {len(after)}"])
    if before and after:
        keys = [k for k in ("mlp", "q_heads", "kv_heads", "experts", "expert_mlp") if k in before[0]]
        rows.append(["layer widths " + "/".join(keys), " / ".join(f"{before[0][k]}->{_span(after, k)}" for k in keys)])
    ppl = report.get("perplexity") or {}
    if ppl.get("before") and ppl.get("after"):
        b, a = ppl["before"]["perplexity"], ppl["after"]["perplexity"]
        rows.append(["perplexity (eval text)", f"{b:.2f} -> {a:.2f}  (x{a / b:.2f})"])
    rows.append(["time", f"{sum(report['timings_s'].values()):.1f}s  "
                 + ", ".join(f"{k} {v:.1f}s" for k, v in report["timings_s"].items())])
    rows.append(["peak memory (RSS)", f"{report['peak_rss_bytes'] / 2**30:.2f} GiB"])
    if report.get("dry_run"):
        rows.append(["checkpoint size (estimate)", f"{report['estimated_checkpoint_bytes'] / 2**20:.0f} MiB"])
        rows.append(["a real run adds (estimate)", f"{report.get('estimated_remaining_s', 0):.0f}s (apply, perplexity, save)"])
        rows.append(["would be saved to", str(out)])
    else:
        rows.append(["saved to", str(out)])
        source = report["source"]["path"]
        rows.append(["full evaluation", f"depgraph-llm eval {out} --baseline {source}  (report.md, plots)"])
    return "\n" + key_value_table(rows, ["", "depgraph-llm prune"])


def _member(param: str) -> str:
    """A parameter's short label: its module ("q_proj") or, for a bare parameter (fused experts), its own name."""
    module, _, leaf = param.rpartition(".")
    return module.rpartition(".")[2] if leaf in ("weight", "bias") else leaf


def groups_table(coupling: CouplingGraph, model, show_all: bool = False) -> str:
    """Groups as a table; by default the global groups plus the first layer's (the others repeat it)."""
    params = dict(model.named_parameters())
    rows = []
    shown_layers = None if show_all else {0}
    for group in coupling.groups:
        if group.layer is not None and shown_layers is not None and group.layer not in shown_layers:
            continue
        if group.kind == GroupKind.LAYER:
            count = sum(params[p].numel() for p in group.params if p in params)
            rows.append([group.name, group.kind.value, 1, "-", f"{count:,}", f"{len(group.params)} params"])
            continue
        per_unit = sum(params[s.param].numel() // s.axis_size * s.length // group.size
                       for s in group.slices if s.param in params)
        members = ", ".join(sorted({f"{_member(s.param)}[{s.axis}]" + (
            f"@{s.offset}" if s.length != s.axis_size else "") for s in group.slices}))  # @offset: a fused segment
        units = f"{group.size}" + (f" x {group.nested.size} q/kv" if group.nested else "")
        rows.append([group.name, group.kind.value, units, group.unit_width, f"{per_unit:,}", members[:70]])
    layers = len(coupling.of_kind(GroupKind.LAYER))
    note = "" if show_all or layers <= 1 else f"\n(layer 0 shown; layers 1..{layers - 1} have the same groups; --all lists them)"
    header = ["group", "kind", "units", "unit width", "params/unit", "coupled slices"]
    extra = f"\nops frozen (no coupling rule): {', '.join(coupling.frozen_ops)}" if coupling.frozen_ops else ""
    return table(rows, header) + note + f"\ntrace: {coupling.trace_seconds:.1f}s" + extra
