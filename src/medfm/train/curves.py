"""``curves.csv`` and ``curves.png`` of a training run's per-epoch history."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from medfm.data.outputs import atomic_path, write_table


def write_curves(history: list[dict[str, float]], folder: Path) -> tuple[Path, Path] | None:
    """``curves.csv`` and ``curves.png``: validation metrics (and losses) per epoch."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = pd.DataFrame(history)
    csv = write_table(table, folder / "curves.csv")
    metrics = [c for c in table.columns if c.startswith("val/") and c != "val/loss"]
    losses = [c for c in ("train/loss", "val/loss") if c in table.columns]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for column in metrics:
        axes[0].plot(table["epoch"], table[column], marker="o", label=column)
    for column in losses:
        axes[1].plot(table["epoch"], table[column], marker="o", label=column)
    for ax, title in zip(axes, ("validation metrics", "losses")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png = folder / "curves.png"
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return csv, png
