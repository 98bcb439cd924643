"""Synthetic chest CT phantoms with lesions of known kind at known seeds, for the demo and tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from medfm.data.io import Geometry, write_volume

LESION_KINDS = ("solid", "part-solid", "cystic", "calcified")


def _ball(grid: tuple[np.ndarray, np.ndarray, np.ndarray], centre_mm: np.ndarray, radius_mm: float) -> np.ndarray:
    z, y, x = grid
    return (x - centre_mm[0]) ** 2 + (y - centre_mm[1]) ** 2 + (z - centre_mm[2]) ** 2 <= radius_mm**2


def make_phantom(
    size_xyz: tuple[int, int, int] = (128, 128, 48),
    spacing: tuple[float, float, float] = (0.8, 0.8, 2.5),
    origin: tuple[float, float, float] = (-51.2, -60.0, -110.0),
    seed: int = 0,
) -> tuple[np.ndarray, Geometry, list[dict[str, object]]]:
    """One chest phantom in HU (int16, (Z, Y, X)) with one lesion of each kind; returns array, geometry, lesions.

    Air -1000, fat -100, soft tissue 40, lungs -850, a vertebra 700 HU, noise σ 12 HU; lesions: solid
    (35 HU), part-solid (ground glass -550 with a 30 HU core), cystic (8 HU, in soft tissue) and calcified
    (650 HU). Each lesion's seed is its centre in LPS world millimetres.
    """
    rng = np.random.default_rng(seed)
    geometry = Geometry(size=size_xyz, spacing=spacing, origin=origin, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    nx, ny, nz = size_xyz
    # Millimetres from the volume's first voxel, per axis (the direction is the identity).
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip((nz, ny, nx), spacing[::-1])), indexing="ij")
    extent = np.array([nx * spacing[0], ny * spacing[1], nz * spacing[2]])
    cx, cy = extent[0] / 2, extent[1] / 2
    hu = np.full(x.shape, -1000.0)
    body = ((x - cx) / (0.46 * extent[0])) ** 2 + ((y - cy) / (0.40 * extent[1])) ** 2 <= 1
    inner = ((x - cx) / (0.42 * extent[0])) ** 2 + ((y - cy) / (0.36 * extent[1])) ** 2 <= 1
    hu[body] = -100.0
    hu[inner] = 40.0
    lungs = []
    for side in (-1, 1):
        lung = ((x - cx - side * 0.2 * extent[0]) / (0.15 * extent[0])) ** 2 + (
            (y - cy + 0.03 * extent[1]) / (0.25 * extent[1])
        ) ** 2 <= 1
        lung &= (z > 0.1 * extent[2]) & (z < 0.95 * extent[2])
        hu[lung] = -850.0
        lungs.append(lung)
    spine = ((x - cx) ** 2 + (y - cy - 0.27 * extent[1]) ** 2) <= (0.06 * extent[0]) ** 2
    hu[spine] = 700.0
    grid = (z, y, x)
    mid = 0.5 * extent[2]
    centres = {
        "solid": np.array([cx - 0.2 * extent[0] + rng.uniform(-3, 3), cy - 0.05 * extent[1], mid + rng.uniform(-8, 8)]),
        "part-solid": np.array(
            [cx + 0.2 * extent[0] + rng.uniform(-3, 3), cy - 0.08 * extent[1], mid + rng.uniform(-8, 8)]
        ),
        "cystic": np.array([cx + rng.uniform(-3, 3), cy - 0.25 * extent[1], mid + rng.uniform(-8, 8)]),
        "calcified": np.array(
            [cx - 0.2 * extent[0], cy + 0.12 * extent[1] + rng.uniform(-2, 2), mid + rng.uniform(-8, 8)]
        ),
    }
    hu[_ball(grid, centres["solid"], 5.0 + rng.uniform(0, 2))] = 35.0
    hu[_ball(grid, centres["part-solid"], 8.0)] = -550.0
    hu[_ball(grid, centres["part-solid"], 3.0)] = 30.0
    hu[_ball(grid, centres["cystic"], 6.0)] = 8.0
    hu[_ball(grid, centres["calcified"], 3.5)] = 650.0
    hu += rng.normal(0.0, 12.0, size=hu.shape)
    lesions = []
    for kind in LESION_KINDS:
        index = centres[kind] / np.asarray(spacing)
        world = geometry.index_to_world(index)
        lesions.append({"lesion_type": kind, "coordX": world[0], "coordY": world[1], "coordZ": world[2]})
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16), geometry, lesions


def make_demo_dataset(folder: str | os.PathLike[str], n_patients: int = 4, seed: int = 0) -> Path:
    """Write ``n_patients`` phantoms as NIfTI and a manifest CSV (relative paths); returns the manifest path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(n_patients):
        origin = (-51.2 + 7.3 * p, -60.0 - 3.1 * p, -110.0 + 11.0 * p)
        array, geometry, lesions = make_phantom(origin=origin, seed=seed + p)
        name = f"images/patient_{p:03d}.nii.gz"
        write_volume(array, geometry, folder / name)
        for lesion in lesions:
            rows.append({"image_path": name, **lesion, "patient_id": f"P{p:03d}"})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest
