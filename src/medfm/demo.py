"""``medfm demo``: a synthetic CT set with lesions of four kinds, cropped and turned into features."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medfm.data.crop import CropResult, crop_manifest
from medfm.data.manifest import read_manifest
from medfm.data.synthetic import make_demo_dataset
from medfm.features.extract import ExtractResult, extract_features
from medfm.models import hub
from medfm.models.registry import PUBLISHED, get_entry


@dataclass
class DemoResult:
    """Where the demo's manifest, patches and features are, and whether the published weights were used."""

    manifest: Path
    crop: CropResult
    extract: ExtractResult
    published_weights: bool


def run_demo(
    out_dir: str | os.PathLike[str] = "outputs/demo",
    model: str = "fmcib-resnet50",
    n_patients: int = 4,
    num_workers: int | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> DemoResult:
    """Make the synthetic set, crop it, extract features; published weights if cached, else explicit random init."""
    out = Path(out_dir)
    manifest_path = make_demo_dataset(out / "data", n_patients=n_patients)
    say(f"synthetic CT set: {n_patients} phantoms, 4 lesions each → {manifest_path}")
    manifest = read_manifest(manifest_path)
    entry = get_entry(model)
    crop = crop_manifest(
        manifest, entry.profile, out / "patches", nifti=True, num_workers=num_workers or 0, progress=progress
    )
    say(f"patches: {crop.patches} ({crop.n_written} rows), index {crop.index}, NIfTI in {crop.nifti_dir}")
    published = entry.weights is not None and hub.cached_path(entry.weights).is_file()
    if not published:
        where = hub.cached_path(entry.weights) if entry.weights else "(none published)"
        say(
            f"published weights for {model} are not in the cache ({where}); extracting with an explicitly "
            f"random-initialised trunk (--random-init, recorded in the sidecar). Get them with "
            f"`medfm weights download {model}`."
        )
    result = extract_features(
        manifest,
        out / "features.parquet",
        model=model,
        weights=PUBLISHED if published else None,
        random_init=not published,
        batch_size=8,
        num_workers=num_workers,
        progress=progress,
    )
    say(f"features: {result.features} ({result.n_rows} rows × {entry.feature_dim}), provenance {result.sidecar}")
    return DemoResult(manifest_path, crop, result, published)
