"""``medfm analyze invariance``: how much do a model's features change under each transform, at each strength?

For every image the features of the transformed input are compared with those of the original, by the cosine of
whitened features (whitening estimated on the originals, :mod:`medfm.analyze.similarity`) and by plain cosine;
each level's mean over the images carries a bootstrap 95% CI. ``--pairs`` compares given image pairs instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medfm.analyze.inputs import Inputs, open_manifest, read_inputs, read_pair_inputs
from medfm.analyze.models import AnalysisModel
from medfm.analyze.report import (
    interval_text,
    markdown_table,
    save_figure,
    write_csv,
    write_row_errors,
    write_summary,
)
from medfm.analyze.similarity import Whitener, fit_whitener, mean_interval, similarities
from medfm.analyze.transforms import FLIP_AXES, UNITS, Level, apply_transform, sweep
from medfm.data.manifest import Manifest
from medfm.data.outputs import pyplot
from medfm.errors import ConfigError
from medfm.progress import progress_bar

MEASURES = ("mahalanobis", "cosine")


@dataclass
class InvarianceResult:
    """The tidy summary (one row per model, level and measure), the per-image table and the output folder."""

    summary: pd.DataFrame
    per_image: pd.DataFrame
    folder: Path


def _whitener(features: np.ndarray, shrinkage: float | None = None) -> Whitener | None:
    if shrinkage is not None and not 0 <= shrinkage <= 1:
        raise ConfigError(f"shrinkage={shrinkage}; must lie in [0, 1]")
    try:
        return fit_whitener(features, shrinkage)
    except ValueError:
        return None  # one image, or constant features: only plain cosine is defined


def transformed_features(
    model: AnalysisModel, inputs: Inputs, level: Level, seed: int = 0, batch_size: int = 16
) -> np.ndarray:
    """Features of every input under one transform; image ``i``'s noise is seeded by (seed, its row)."""
    feats = []
    for start in range(0, len(inputs), batch_size):
        chunk = [
            apply_transform(inputs.tensor(i), level, seed=seed * 1_000_003 + inputs.rows[i])
            for i in range(start, min(start + batch_size, len(inputs)))
        ]
        feats.append(model.features(torch.cat(chunk)).numpy())
    return np.concatenate(feats)


def measure_model(
    model: AnalysisModel,
    inputs: Inputs,
    levels: list[Level],
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
    shrinkage: float | None = None,
) -> pd.DataFrame:
    """Per-image similarities of one model at every level: columns model, transform, strength, row, measures."""
    original = model.features(inputs.batch(), chunk=batch_size).numpy()
    whitener = _whitener(original, shrinkage)
    frames = []
    with progress_bar(progress) as bar:
        task = bar.add_task(f"invariance of {model.name}", total=len(levels))
        for level in levels:
            sims = similarities(original, transformed_features(model, inputs, level, seed, batch_size), whitener)
            frames.append(
                pd.DataFrame(
                    {
                        "model": model.name,
                        "transform": level.transform,
                        "strength": level.strength,
                        "level": level.label,
                        "row": inputs.rows,
                        **sims,
                    }
                )
            )
            bar.advance(task)
    return pd.concat(frames, ignore_index=True)


def summarise(per_image: pd.DataFrame, n_bootstrap: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean with bootstrap CI of each measure, per model and level (tidy: one row per measure)."""
    rows = []
    keys = ["model", "transform", "strength", "level"]
    for key, group in per_image.groupby(keys, sort=False):
        for measure in MEASURES:
            ci = mean_interval(group[measure].to_numpy(), n_bootstrap, seed=seed)
            rows.append(dict(zip(keys, key)) | {"measure": measure, "mean": ci.value, "low": ci.low, "high": ci.high})
            rows[-1]["n"] = int(np.isfinite(group[measure]).sum())
            rows[-1]["unit"] = UNITS.get(key[1], "")
    return pd.DataFrame(rows)


def plot_invariance(summary: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Similarity against strength, one panel per transform, one line (with its CI band) per model; whitened
    cosine solid, plain cosine dashed."""
    plt = pyplot()
    transforms = [t for t in dict.fromkeys(summary["transform"]) if t != "identity"] or ["identity"]
    cols = min(3, len(transforms))
    rows = int(np.ceil(len(transforms) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, transform in zip(axes.flat, transforms):
        part = summary[summary["transform"] == transform]
        for k, model in enumerate(dict.fromkeys(summary["model"])):
            for measure, style in (("mahalanobis", "-"), ("cosine", "--")):
                line = part[(part["model"] == model) & (part["measure"] == measure)].sort_values("strength")
                if line.empty or not np.isfinite(line["mean"]).any():
                    continue
                colour = colours[k % len(colours)]
                label = f"{model} ({'whitened' if measure == 'mahalanobis' else 'cosine'})"
                ax.plot(line["strength"], line["mean"], style, marker="o", color=colour, label=label)
                ax.fill_between(line["strength"], line["low"], line["high"], color=colour, alpha=0.15)
        if transform == "flip":
            ticks = sorted(part["strength"].unique())
            ax.set_xticks(ticks, [FLIP_AXES[int(t)].split()[0] for t in ticks])
        ax.set_title(transform)
        ax.set_xlabel(UNITS.get(transform, ""))
        ax.set_ylabel("similarity to original")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(transforms) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), bbox_to_anchor=(0.5, -0.02))
        fig.subplots_adjust(bottom=0.12)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save_figure(fig, path)


def _table_text(summary: pd.DataFrame) -> str:
    """Levels as rows, models × measures as columns, each cell a mean with its CI."""
    wide = summary.assign(
        cell=[interval_text(m, lo, hi, n=n) for m, lo, hi, n in summary[["mean", "low", "high", "n"]].values]
    )
    wide["column"] = wide["model"] + " · " + wide["measure"].map({"mahalanobis": "whitened", "cosine": "cosine"})
    table = wide.pivot_table(index=["level"], columns="column", values="cell", aggfunc="first", sort=False)
    return markdown_table(table.reset_index())


def run_invariance(
    models: list[AnalysisModel],
    manifest: str | os.PathLike[str] | Manifest,
    out: str | os.PathLike[str],
    transforms: list[str] | None = None,
    strengths: dict[str, list[float]] | None = None,
    limit: int | None = None,
    coords: str = "lps",
    on_error: str = "raise",
    n_bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    shrinkage: float | None = None,
) -> InvarianceResult:
    """Invariance of each model's features to each transform at each strength over the manifest's images."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    levels = sweep(models[0].dims, transforms, strengths)
    frames, errors, table = [], {}, None
    for model in models:
        opened = open_manifest(manifest, model.dims, coords)
        inputs = read_inputs(opened, model, limit, on_error, progress)
        errors.update(inputs.errors)
        table = opened.table
        frame = measure_model(model, inputs, levels, seed, batch_size, progress, shrinkage)
        frame.insert(5, "image_path", [opened.paths[r] for r in frame["row"]])
        frames.append(frame)
    per_image = pd.concat(frames, ignore_index=True)
    summary = summarise(per_image, n_bootstrap, seed)
    write_csv(per_image, folder / "invariance_per_image.csv")
    write_csv(summary, folder / "invariance.csv")
    plot_invariance(summary, folder / "invariance.png")
    if table is not None:
        write_row_errors(table, errors, folder, "invariance")
    n_images = per_image.groupby("model")["row"].nunique().to_dict()
    sections = [
        f"Models: {', '.join(f'{m.name} ({n_images.get(m.name, 0)} images)' for m in models)}. "
        "Similarity of each image's features after the transform to its original features: cosine of features "
        "centred and whitened with the Ledoit–Wolf shrunk covariance of the originals (*whitened*), and plain "
        f"cosine; means over images with {n_bootstrap}-resample bootstrap 95% CIs. 1 = fully invariant.",
        _table_text(summary),
        "![invariance](invariance.png)",
    ]
    if errors:
        sections.append(f"{len(errors)} bad rows were skipped (`invariance.errors.csv`).")
    write_summary(
        folder,
        "Invariance",
        sections,
        {
            "analysis": "invariance",
            "manifest": str(getattr(manifest, "source", manifest)),
            "models": [m.provenance | {"label": m.name} for m in models],
            "levels": [{"transform": lv.transform, "strength": lv.strength} for lv in levels],
            "limit": limit,
            "seed": seed,
            "n_bootstrap": n_bootstrap,
            "shrinkage": "ledoit-wolf" if shrinkage is None else shrinkage,
        },
    )
    return InvarianceResult(summary, per_image, folder)


def run_pair_invariance(
    models: list[AnalysisModel],
    pairs: str | os.PathLike[str],
    out: str | os.PathLike[str],
    limit: int | None = None,
    coords: str = "lps",
    on_error: str = "raise",
    n_bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
    shrinkage: float | None = None,
) -> InvarianceResult:
    """Similarity of features of given pairs (columns ``a``, ``b``); whitening estimated on the ``a`` side."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    frames, errors, table = [], {}, None
    for model in models:
        table, a, b = read_pair_inputs(pairs, model, limit, on_error, coords)
        errors.update(a.errors)
        fa = model.features(a.batch(), chunk=batch_size).numpy()
        fb = model.features(b.batch(), chunk=batch_size).numpy()
        frame = a.table.copy()
        frame.insert(0, "row", a.rows)
        frame.insert(0, "model", model.name)
        for key, values in similarities(fa, fb, _whitener(fa, shrinkage)).items():
            frame[key] = values
        frames.append(frame)
    per_pair = pd.concat(frames, ignore_index=True)
    rows = []
    for model, group in per_pair.groupby("model", sort=False):
        for measure in MEASURES:
            ci = mean_interval(group[measure].to_numpy(), n_bootstrap, seed=seed)
            rows.append({"model": model, "measure": measure, "mean": ci.value, "low": ci.low, "high": ci.high})
            rows[-1]["n"] = int(np.isfinite(group[measure]).sum())
    summary = pd.DataFrame(rows)
    write_csv(per_pair, folder / "pairs_per_pair.csv")
    write_csv(summary, folder / "pairs.csv")
    if table is not None:
        write_row_errors(table, errors, folder, "pairs")
    shown = summary.assign(
        similarity=[interval_text(m, lo, hi, n=n) for m, lo, hi, n in summary[["mean", "low", "high", "n"]].values]
    )
    write_summary(
        folder,
        "Invariance between pairs",
        [
            f"Pairs file `{pairs}`. Similarity of the features of `b` to those of `a` (whitening estimated on the "
            f"`a` images), means over pairs with {n_bootstrap}-resample bootstrap 95% CIs.",
            markdown_table(shown[["model", "measure", "similarity", "n"]]),
        ],
        {
            "analysis": "invariance-pairs",
            "pairs": str(pairs),
            "models": [m.provenance | {"label": m.name} for m in models],
            "seed": seed,
        },
    )
    return InvarianceResult(summary, per_pair, folder)
