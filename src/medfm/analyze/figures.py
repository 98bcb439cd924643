"""Pictures of inputs, maps and reconstructions: 2D images as they are, 3D volumes as three orthogonal slices
(axial, coronal, sagittal) through a chosen voxel (by default the patch centre, where the seed lies)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medfm.analyze.report import save_figure
from medfm.data.outputs import pyplot

PLANES = ("axial", "coronal", "sagittal")


def display_image(array: np.ndarray) -> np.ndarray:
    """A (C, …) model input as one grey image in [0, 1] (channel mean, min–max)."""
    grey = np.asarray(array, dtype=np.float64).mean(axis=0)
    low, high = grey.min(), grey.max()
    return (grey - low) / (high - low) if high > low else np.zeros_like(grey)


def orthogonal_slices(volume: np.ndarray, centre: tuple[int, ...] | None = None) -> list[np.ndarray]:
    """The axial (Y, X), coronal (Z, X) and sagittal (Z, Y) slices of a (Z, Y, X) array through ``centre``."""
    z, y, x = centre if centre is not None else tuple(s // 2 for s in volume.shape)
    return [volume[z], volume[:, y, :], volume[:, :, x]]


def _views(image: np.ndarray, centre: tuple[int, ...] | None) -> list[tuple[str, np.ndarray]]:
    if image.ndim == 2:
        return [("", image)]
    return list(zip(PLANES, orthogonal_slices(image, centre)))


def save_overlays(
    path: str | os.PathLike[str],
    image: np.ndarray,
    maps: dict[str, np.ndarray],
    title: str = "",
    centre: tuple[int, ...] | None = None,
) -> Path:
    """The input and each map over it (jet, half transparent): one row per map, each with a colour bar of the map's
    values (one scale for its slices); 3D inputs as three slices."""
    plt = pyplot()
    grey = display_image(image)
    rows = [("input", None), *maps.items()]
    first = _views(grey, centre)
    fig, axes = plt.subplots(len(rows), len(first), figsize=(2.6 * len(first) + 0.8, 2.6 * len(rows)), squeeze=False)
    for r, (name, value) in enumerate(rows):
        shown = _views(np.asarray(value, dtype=np.float64), centre) if value is not None else None
        for c, (plane, base) in enumerate(first):
            ax = axes[r, c]
            ax.imshow(base, cmap="gray", interpolation="nearest")
            if shown is not None:
                top = shown[c][1]
                drawn = ax.imshow(
                    top, cmap="jet", alpha=0.45, interpolation="bilinear", vmin=np.min(value), vmax=np.max(value)
                )
            ax.set_title(f"{name} {plane}".strip(), fontsize=8)
            ax.axis("off")
        if shown is not None:
            bar = fig.colorbar(drawn, ax=list(axes[r]), fraction=0.046, pad=0.02)
            bar.solids.set_alpha(1.0)  # the scale drawn opaque, not at the overlay's transparency
            bar.set_label(name, fontsize=8)
            bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def save_reconstructions(
    path: str | os.PathLike[str], target: np.ndarray, recons: dict[int, np.ndarray], title: str = ""
) -> Path:
    """The target and the reconstructions after each iteration count, side by side (3D: three slices each)."""
    plt = pyplot()
    columns = [("target", target), *((f"iteration {k}", v) for k, v in sorted(recons.items()))]
    planes = len(_views(display_image(target), None))
    fig, axes = plt.subplots(planes, len(columns), figsize=(2.4 * len(columns), 2.4 * planes), squeeze=False)
    for c, (name, value) in enumerate(columns):
        for r, (plane, view) in enumerate(_views(display_image(value), None)):
            ax = axes[r, c]
            ax.imshow(view, cmap="gray", interpolation="nearest")
            ax.set_title(f"{name} {plane}".strip(), fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
