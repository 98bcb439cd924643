"""What every analysis leaves in its folder: tidy CSVs, figures and ``summary.md``, all written atomically."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

import medfm
from medfm.data.outputs import atomic_path, write_errors, write_figure, write_json, write_table


def save_figure(fig: object, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Write a matplotlib figure atomically (format from the suffix: png, svg, pdf) and close it."""
    return write_figure(fig, path, dpi=dpi)


def write_csv(table: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """A tidy table as CSV, atomically."""
    return write_table(table, Path(path))


def markdown_table(table: pd.DataFrame, digits: int = 3) -> str:
    """A small table as GitHub Markdown; floats to ``digits`` decimals."""

    def cell(value: object) -> str:
        if isinstance(value, (float, np.floating)):
            return "" if not np.isfinite(value) else f"{value:.{digits}f}"
        return str(value)

    lines = ["| " + " | ".join(str(c) for c in table.columns) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def interval_text(value: float, low: float, high: float, digits: int = 3, n: int | None = None) -> str:
    """``0.912 (0.880–0.941, n = 40)``, ``0.010 (no CI, n = 4)`` when n was too small for one, ``n/a`` when undefined."""
    if not np.isfinite(value):
        return "n/a"
    count = "" if n is None else f"n = {int(n)}"
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"{value:.{digits}f} (no CI{', ' + count if count else ''})"
    return f"{value:.{digits}f} ({low:.{digits}f}–{high:.{digits}f}{', ' + count if count else ''})"


def write_summary(folder: str | os.PathLike[str], title: str, sections: list[str], provenance: dict) -> Path:
    """``summary.md`` (title, sections, the files beside it) and ``analysis.json`` (settings and provenance)."""
    folder = Path(folder)
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    files = [f for f in files if f not in ("summary.md", "analysis.json")] + ["analysis.json"]
    text = "\n\n".join([f"# {title}", *sections, "Files: " + ", ".join(f"`{f}`" for f in files)]) + "\n"
    write_json({"medfm_version": medfm.__version__, **provenance}, folder / "analysis.json")
    path = folder / "summary.md"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def write_row_errors(table: pd.DataFrame, errors: dict[int, str], folder: Path, name: str) -> Path | None:
    """Bad rows of a manifest as ``NAME.errors.csv`` in the folder (none: no file)."""
    return write_errors(table, errors, folder / f"{name}.csv")


def slug(text: str) -> str:
    """A file-name-safe form of a model label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"
