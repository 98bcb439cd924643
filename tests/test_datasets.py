"""Reading only the box the patches need gives the same patches as reading the whole scan."""

from __future__ import annotations

import numpy as np
import pandas as pd
import SimpleITK as sitk

from medfm.data.datasets import VolumePatches
from medfm.data.io import read_region, read_volume
from medfm.data.manifest import read_manifest
from medfm.data.patches import crop_patch
from medfm.data.profiles import FMCIB, FMCIB_CENTRED


def test_read_region_keeps_values_and_geometry(small_ct):
    region = read_region(small_ct.path, (5, 7, 3), (10, 8, 6))
    np.testing.assert_array_equal(region.array, small_ct.array[3:9, 7:15, 5:15])
    assert region.geometry.size == (10, 8, 6)
    assert region.geometry.spacing == small_ct.geometry.spacing
    assert region.geometry.direction == small_ct.geometry.direction
    np.testing.assert_allclose(region.geometry.origin, small_ct.image.TransformIndexToPhysicalPoint((5, 7, 3)))


def test_region_reads_equal_whole_volume_crops(tmp_path):
    rng = np.random.default_rng(7)
    image = sitk.GetImageFromArray(rng.integers(-1024, 2000, size=(30, 70, 64)).astype(np.int16))
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-20.5, 31.0, -150.25))
    image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    volume = read_volume(tmp_path / "ct.nii.gz")
    # Interior, near each border, a corner, and between voxels.
    indices = [(30, 35, 15), (1.2, 35, 15), (62.7, 3.1, 28.6), (0, 0, 0), (10.5, 60.25, 2.75)]
    seeds = [volume.geometry.index_to_world(np.array(i)) for i in indices]
    pd.DataFrame(
        {
            "image_path": "ct.nii.gz",
            "coordX": [s[0] for s in seeds],
            "coordY": [s[1] for s in seeds],
            "coordZ": [s[2] for s in seeds],
        }
    ).to_csv(tmp_path / "m.csv", index=False)
    manifest = read_manifest(tmp_path / "m.csv")
    for profile in (FMCIB, FMCIB_CENTRED):
        item = VolumePatches(manifest, profile)[0]
        assert item.rows == [0, 1, 2, 3, 4] and not item.errors
        for row, patch in zip(item.rows, item.patches):
            np.testing.assert_allclose(patch, crop_patch(volume, seeds[row], profile), rtol=0, atol=1e-6)


def test_patches_of_a_dicom_stack_read_by_the_box_equal_whole_series_crops(tmp_path):
    from test_segment_dicomseg import write_series  # oblique, shuffled files, InstanceNumbers out of order

    write_series(tmp_path / "series")
    volume = read_volume(tmp_path / "series")
    indices = [(10, 8, 3), (0.5, 1.5, 0.2), (19, 15, 5), (7.25, 11.5, 2.5)]  # interior, corners, between voxels
    seeds = [volume.geometry.index_to_world(np.array(i, float)) for i in indices]
    pd.DataFrame({"image_path": "series", **{c: [s[k] for s in seeds] for k, c in enumerate(("coordX", "coordY", "coordZ"))}}).to_csv(
        tmp_path / "m.csv", index=False
    )  # fmt: skip
    manifest = read_manifest(tmp_path / "m.csv")
    for profile in (FMCIB, FMCIB_CENTRED):
        item = VolumePatches(manifest, profile)[0]
        assert item.rows == [0, 1, 2, 3] and not item.errors
        for row, patch in zip(item.rows, item.patches):
            np.testing.assert_allclose(patch, crop_patch(volume, seeds[row], profile), rtol=0, atol=1e-5)
