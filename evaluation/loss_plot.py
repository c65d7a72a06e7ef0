"""The recovery loss curve (prune_report.json's `recovery.loss_curve`) as a PNG."""
from __future__ import annotations

import json
from pathlib import Path


def recovery_loss_curve(model_dir: Path) -> list[list[float]] | None:
    """[[step, loss], ...] from a recovered checkpoint's report, or None."""
    report = Path(model_dir) / "prune_report.json"
    if not report.is_file():
        return None
    return (json.loads(report.read_text()).get("recovery") or {}).get("loss_curve")


def plot_loss_curves(curves: dict[str, list[list[float]]], path: Path) -> bool:
    """One line per model; returns False (and writes nothing) when there is no curve."""
    curves = {label: curve for label, curve in curves.items() if curve}
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        ax.plot([p[0] for p in curve], [p[1] for p in curve], label=label, linewidth=1)
    ax.set(xlabel="optimizer step", ylabel="training loss", title="Recovery loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
