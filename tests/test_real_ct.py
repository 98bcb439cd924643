"""End to end on a real chest CT (LIDC-IDRI-0001) with its radiologist-annotated nodule."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medfm.data.datasets import iter_volume_items
from medfm.data.manifest import read_manifest
from medfm.data.profiles import FMCIB_CENTRED, get_profile
from medfm.features.extract import extract_features

LIDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "lidc_idri_0001"
CT = LIDC / "lidc_idri_0001_ct_uint8_1.4x1.4x2.5mm.nii.gz"


@pytest.fixture
def nodule_manifest(tmp_path: Path) -> Path:
    if not CT.exists():
        pytest.skip(f"{LIDC} not found (shared data absent)")
    notes = json.loads((LIDC / "lidc_idri_0001_nodule_annotations.json").read_text())
    i, j, k = notes["nodule_consensus_centroid_ijk"]
    rows = [
        {"image_path": str(CT), "coordX": i, "coordY": j, "coordZ": k, "malignancy": 5},
        {"image_path": str(CT), "coordX": 60.0, "coordY": 60.0, "coordZ": 20.0, "malignancy": 0},
    ]
    path = tmp_path / "lidc.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_nodule_is_at_the_centre_of_its_patch(nodule_manifest: Path):
    manifest = read_manifest(nodule_manifest, coords="voxel")
    with pytest.warns(UserWarning, match="8-bit"):
        items = list(iter_volume_items(manifest, FMCIB_CENTRED))
    assert len(items) == 1 and items[0].rows == [0, 1]  # one read for both rows
    raw = items[0].patches[0][0] * 3072 - 1024  # back to the file's (windowed, 0..255) values
    centre = raw[23:28, 23:28, 23:28]
    shell = raw[15:36, 15:36, 15:36].copy()
    shell[5:16, 5:16, 5:16] = np.nan
    # The nodule (grey in the windowed scan) fills the centre; the lung around it is black (0).
    assert centre.mean() > 15 and (centre < 1).mean() < 0.1
    assert np.nanmean(shell < 1) > 0.3


def test_extract_on_real_ct(nodule_manifest: Path, tmp_path: Path):
    manifest = read_manifest(nodule_manifest, coords="voxel")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = extract_features(
            manifest, tmp_path / "f.parquet", model="resnet10-3d", random_init=True, num_workers=0, progress=False
        )
    table = pd.read_parquet(result.features)
    assert list(table["malignancy"]) == [5, 0]
    feats = table[[f"feat_{d}" for d in range(512)]].to_numpy()
    assert np.isfinite(feats).all() and not np.allclose(feats[0], feats[1])
    assert get_profile("fmcib").name == json.loads(result.sidecar.read_text())["profile"]["name"]
