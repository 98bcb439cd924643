"""CT-like volumes for the speed benchmarks: a body ellipse with two lungs and noise, seeds inside the body."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def make_volumes(
    folder: Path,
    n_volumes: int,
    size_xyz: tuple[int, int, int],
    spacing: tuple[float, float, float],
    n_seeds: int,
    suffix: str = ".nii",
    seed_box: tuple[tuple[float, ...], tuple[float, ...]] = ((0.35, 0.35, 0.25), (0.65, 0.65, 0.75)),
) -> Path:
    """Write ``n_volumes`` int16 volumes (HU) and a manifest of ``n_seeds`` LPS seeds each, drawn uniformly in
    ``seed_box`` (fractions of the volume, x y z); returns the manifest's path."""
    from medfm.data.io import Geometry, write_volume

    rng = np.random.default_rng(0)
    rows = []
    nx, ny, nz = size_xyz
    yy, xx = np.mgrid[0:ny, 0:nx]
    body = ((xx - nx / 2) / (0.45 * nx)) ** 2 + ((yy - ny / 2) / (0.38 * ny)) ** 2 <= 1
    lungs = (((np.abs(xx - nx / 2) - 0.2 * nx) / (0.13 * nx)) ** 2 + ((yy - ny / 2) / (0.25 * ny)) ** 2) <= 1
    low, high = (np.asarray(b) * np.asarray(size_xyz) for b in seed_box)
    for v in range(n_volumes):
        slab = np.where(body, 40, -1000).astype(np.int16)
        slab[lungs] = -850
        array = np.broadcast_to(slab, (nz, ny, nx)).copy()
        array += rng.normal(0, 15, size=array.shape).astype(np.int16)
        origin = (-nx * spacing[0] / 2 + v, -ny * spacing[1] / 2, -nz * spacing[2] / 2 - 5 * v)
        geometry = Geometry(size_xyz, spacing, origin, (1, 0, 0, 0, 1, 0, 0, 0, 1))
        path = folder / f"ct_{v}{suffix}"
        write_volume(array, geometry, path)
        for _ in range(n_seeds):
            world = geometry.index_to_world(rng.uniform(low, high))
            rows.append({"image_path": path.name, "coordX": world[0], "coordY": world[1], "coordZ": world[2]})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest
