"""``curves.csv`` and ``curves.png`` of a training run's per-epoch history."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from medfm.data.outputs import pyplot, write_figure, write_table


def write_curves(history: list[dict[str, float]], folder: Path, title: str = "") -> tuple[Path, Path] | None:
    """``curves.csv`` and ``curves.png``: validation metrics (and losses) per epoch, under ``title`` (the model and
    task: a figure that says what it shows)."""
    if not history:
        return None
    plt = pyplot()
    table = pd.DataFrame(history)
    csv = write_table(table, folder / "curves.csv")
    metrics = [c for c in table.columns if c.startswith("val/") and c != "val/loss"]
    losses = [c for c in ("train/loss", "val/loss") if c in table.columns]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for column in metrics:
        axes[0].plot(table["epoch"], table[column], marker="o", label=column)
    for column in losses:
        axes[1].plot(table["epoch"], table[column], marker="o", label=column)
    for ax, name in zip(axes, ("validation metrics", "losses")):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return csv, write_figure(fig, folder / "curves.png", dpi=100)
