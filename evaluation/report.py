"""Evaluation reports: report.json (schema below), report.md and PNG plots, written atomically.

report.json keys: "models" -> {label: {"path", "params", "perplexity", "accuracy": {task: {"acc", "items",
"chance"}}, "tokens_per_s": {"prefill", "decode"}, "peak_memory_bytes", "layer_widths"}}, "speed" ->
{label: compare_speed(...) result against the baseline}, "protocol" -> how each number was measured.
"""
from __future__ import annotations

import json
from pathlib import Path

from depgraph_llm.checkpoint.files import atomic_dir

from .loss_plot import plot_loss_curves


def _markdown(report: dict) -> str:
    models = report["models"]
    tasks = sorted({t for m in models.values() for t in m.get("accuracy", {})})
    header = ["model", "params", "perplexity", *tasks, "prefill tok/s", "decode tok/s",
              "peak memory MiB (own process)"]
    lines = ["# Evaluation report", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, m in models.items():
        accs = [f"{m['accuracy'][t]['acc']:.3f}" if t in m.get("accuracy", {}) else "-" for t in tasks]
        speed = m.get("tokens_per_s", {})
        measured = [f"{speed['prefill']:.1f}" if "prefill" in speed else "-",  # "-": not measured (--no-speed)
                    f"{speed['decode']:.1f}" if "decode" in speed else "-",
                    f"{m['peak_memory_bytes'] / 2**20:.0f}" if m.get("peak_memory_bytes") else "-"]
        lines.append("| " + " | ".join([label, f"{m['params'] / 1e6:.2f}M", f"{m['perplexity']:.2f}", *accs,
                                         *measured]) + " |")
    if tasks:
        chance = {t: next((m["accuracy"][t].get("chance") for m in models.values() if t in m.get("accuracy", {})), None)
                  for t in tasks}
        lines += ["", "Chance level: " + ", ".join(f"{t} {c:.3f}" if c is not None else f"{t} n/a (open vocabulary)"
                                                   for t, c in chance.items())]
    for label, s in report.get("speed", {}).items():
        lines += ["", f"Speed of {label} vs baseline ({s['pruned']['device']}, {s['pruned']['dtype']}): prefill "
                      f"x{s['speedup_prefill']:.2f}, decode x{s['speedup_decode']:.2f}, ideal from linear-layer FLOPs "
                      f"x{s['ideal_speedup_flops']:.2f}; spread of the repeats ((max - min) / median): "
                      + ", ".join(f"{side} {phase} {s[side].get(phase + '_spread', 0):.0%}"
                                  for side in ("dense", "pruned") for phase in ("prefill", "decode"))]
        if s.get("warning"):
            lines += ["", f"**Warning:** {s['warning']}"]
    lines += ["", "Protocol: " + report.get("protocol", ""), "", "![perplexity](perplexity.png)",
              "![widths](layer_widths.png)", "![speed](speedup.png)"]
    if any(m.get("recovery_loss_curve") for m in models.values()):
        lines.append("![recovery loss](recovery_loss.png)")
    return "\n".join(lines) + "\n"


def _plots(report: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    fig, ax = plt.subplots(figsize=(6, 4))
    points = sorted((1 - m["params"] / max(x["params"] for x in models.values()), m["perplexity"], label)
                    for label, m in models.items())
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    for x, y, label in points:
        ax.annotate(label, (x, y), fontsize=7)
    ax.set(xlabel="fraction of parameters removed", ylabel="perplexity", yscale="log", title="Perplexity vs ratio")
    fig.tight_layout()
    fig.savefig(folder / "perplexity.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    with_widths = [(label, m["layer_widths"]) for label, m in models.items()
                   if m.get("layer_widths") and "mlp" in m["layer_widths"][0]]
    bar = 0.8 / max(1, len(with_widths))
    for index, (label, widths) in enumerate(with_widths):
        ax.bar([w["layer"] + bar * index for w in widths], [w["mlp"] for w in widths], width=bar, label=label)
    ax.set(xlabel="layer", ylabel="MLP width", title="Per-layer MLP widths")
    if ax.has_data():
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "layer_widths.png", dpi=110)
    plt.close(fig)

    plot_loss_curves({label: m.get("recovery_loss_curve") for label, m in models.items()},
                     folder / "recovery_loss.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = list(report.get("speed", {}))
    for offset, (key, name) in enumerate([("speedup_prefill", "prefill"), ("speedup_decode", "decode"),
                                          ("ideal_speedup_flops", "ideal (FLOPs)")]):
        ax.bar([i + 0.27 * offset for i in range(len(labels))], [report["speed"][l][key] for l in labels],
               width=0.27, label=name)
    ax.set_xticks([i + 0.27 for i in range(len(labels))], labels, fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set(ylabel="speedup vs baseline", title="Achieved vs ideal speedup")
    if labels:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "speedup.png", dpi=110)
    plt.close(fig)


def write_report(report: dict, folder: Path, overwrite: bool = True) -> Path:
    """Write report.json, report.md and the plots into `folder` (atomically replaced)."""
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (tmp / "report.md").write_text(_markdown(report))
        _plots(report, tmp)
    return folder
