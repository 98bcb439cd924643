"""ROC and precision-recall figures a paper can use: one or several models on the same axes, fixed to [0, 1],
the chance diagonal on ROC and the prevalence line on PR, a title naming the model, the data and the split."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medfm.data.outputs import pyplot, read_sidecar, write_figure


@dataclass(frozen=True)
class Scores:
    """One model's scores for one positive class on the test rows: a legend label, 0/1 truth, scores."""

    label: str
    truth: np.ndarray
    score: np.ndarray


def describe_features(features: str | os.PathLike[str] | pd.DataFrame) -> tuple[str, str]:
    """(model, data set) of a feature table: the model from its sidecar, the data set from the manifest it names
    (else the table's own name)."""
    if isinstance(features, pd.DataFrame):
        return "features", "a DataFrame"
    path = Path(features)
    meta = read_sidecar(path) if path.is_file() else None
    meta = meta or {}
    return str(meta.get("model") or path.stem), Path(str(meta.get("manifest") or path.name)).name


def roc_pr_figures(
    scores: list[Scores], title: str, out: str | os.PathLike[str], figure_format: str = "png"
) -> list[Path]:
    """``roc.<fmt>`` and ``pr.<fmt>`` in ``out``: every model's curve on one pair of axes; returns the files."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    plt = pyplot()
    usable = [s for s in scores if 0 < int(np.sum(s.truth)) < len(s.truth)]
    written = []
    for kind in ("roc", "pr"):
        fig, ax = plt.subplots(figsize=(5.2, 5.2))
        prevalences = set()
        for s in usable:
            if kind == "roc":
                x, y, _ = roc_curve(s.truth, s.score)
                value = f"AUC {roc_auc_score(s.truth, s.score):.3f}"
            else:
                y, x, _ = precision_recall_curve(s.truth, s.score)
                value = f"AP {average_precision_score(s.truth, s.score):.3f}"
                prevalences.add(round(float(np.mean(s.truth)), 6))
            ax.plot(x, y, drawstyle="steps-post" if kind == "pr" else "default", label=f"{s.label} ({value})")
        if kind == "roc":
            ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
            ax.set_xlabel("false positive rate (1 − specificity)")
            ax.set_ylabel("true positive rate (sensitivity)")
        else:
            for p in sorted(prevalences):
                ax.axhline(p, color="grey", linestyle=":", label=f"prevalence {p:.3f}")
            ax.set_xlabel("recall (sensitivity)")
            ax.set_ylabel("precision (positive predictive value)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.set_title(("ROC" if kind == "roc" else "Precision-recall") + f"\n{title}", fontsize=9)
        if not usable:
            ax.text(0.5, 0.5, "one class only in the test rows: no curve", ha="center", va="center", fontsize=8)
        ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")
        written.append(write_figure(fig, Path(out) / f"{kind}.{figure_format}"))
    return written
