"""Reading only the box the patches need gives the same patches as reading the whole scan."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
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


# ------------------------------------------------------------------------------------------- damaged inputs


def _nan_volume(tmp_path, suffix):
    """An 80³ float32 CT (1 mm, origin 0) in HU with one NaN at voxel (x, y, z) = (10, 11, 12); two seeds, near and far."""
    from medfm.data.io import Geometry, write_volume

    array = np.random.default_rng(3).uniform(-1000, 400, size=(80, 80, 80)).astype(np.float32)
    array[12, 11, 10] = np.nan
    geometry = Geometry((80, 80, 80), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    path = write_volume(array, geometry, tmp_path / f"nan{suffix}")
    pd.DataFrame({"image_path": [path.name] * 2, "coordX": [12.0, 60.0], "coordY": [12.0, 62.0], "coordZ": [12.0, 64.0]}).to_csv(
        tmp_path / "m.csv", index=False
    )  # fmt: skip
    return read_manifest(tmp_path / "m.csv"), array, geometry


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_nan_voxels_around_a_seed_are_a_row_error_or_a_flagged_row(tmp_path, suffix):
    from medfm.data.io import Volume

    manifest, array, geometry = _nan_volume(tmp_path, suffix)
    if suffix == ".nii.gz":  # ITK reads NaN in NIfTI as 0 without a word; medfm reads the voxels itself and says so
        with pytest.warns(UserWarning) as caught:
            assert read_volume(manifest.paths[0]).array[12, 11, 10] == 0.0
        assert [str(w.message) for w in caught] == [
            f"{manifest.paths[0]}: 1 NaN/Inf voxels (first at voxel (10, 11, 12)), which SimpleITK reads from NIfTI as 0"
        ]
    item = VolumePatches(manifest, FMCIB)[0]
    assert item.errors == {
        0: "1 NaN/Inf voxel where the patch is sampled (first at voxel (10, 11, 12)); --non-finite pad reads them as "
        "-1024 and flags the row"
    }
    assert item.rows == [1]  # the far seed is untouched
    far = array.copy()
    far[12, 11, 10] = -1024.0
    np.testing.assert_allclose(
        item.patches[0], crop_patch(Volume(far, geometry, ""), (60.0, 62.0, 64.0), FMCIB), atol=1e-6
    )

    item = VolumePatches(manifest, FMCIB, non_finite="pad")[0]
    assert item.rows == [0, 1] and not item.errors
    assert item.flags == {
        0: "1 NaN/Inf voxel where the patch is sampled (first at voxel (10, 11, 12)), padded with -1024"
    }
    expected = crop_patch(Volume(far, geometry, ""), (12.0, 12.0, 12.0), FMCIB)
    assert np.isfinite(item.patches[0]).all()
    np.testing.assert_allclose(item.patches[0], expected, atol=1e-6)


def test_disagreeing_qform_and_sform_are_named_with_the_distance_and_the_one_used(tmp_path):
    import warnings

    nib = pytest.importorskip("nibabel")
    from medfm.data.datasets import iter_volume_items

    sform = np.diag([1.0, 1.0, 2.0, 1.0])
    sform[:3, 3] = (10.0, 20.0, 30.0)
    qform = sform.copy()
    qform[0, 3] = 0.0  # 10 mm apart along x
    for scode, used in ((1, "sform"), (2, "qform")):  # ITK prefers a scanner sform, else the qform; nibabel the sform
        image = nib.Nifti1Image(np.full((20, 20, 10), -500, np.int16), None)
        image.set_sform(sform, code=scode)
        image.set_qform(qform, code=1)
        path = tmp_path / f"s{scode}.nii.gz"
        nib.save(image, path)
        lps = (-(10.0 if used == "sform" else 0.0) - 5, -25.0, 40.0)
        pd.DataFrame({"image_path": [path.name], "coordX": [lps[0]], "coordY": [lps[1]], "coordZ": [lps[2]]}).to_csv(
            tmp_path / "m.csv", index=False
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            items = list(iter_volume_items(read_manifest(tmp_path / "m.csv"), FMCIB))
        assert items[0].rows == [0]
        messages = [str(w.message) for w in caught if "qform" in str(w.message)]
        expected = (
            f"{path}: the NIfTI qform (code 1) and sform (code {scode}) disagree by up to 10.0 mm (voxel (0, 0, 0) at "
            f"LPS (0.0, -20.0, 30.0) by the qform, (-10.0, -20.0, 30.0) by the sform); medfm reads with SimpleITK, "
            f"which uses the {used} here (nibabel and nilearn use the sform); check which one is right"
        )
        assert messages == [expected]
        with pytest.warns(UserWarning) as caught:  # whole-volume reads (segment, analyze, stores) say it too
            read_volume(path)
        assert [str(w.message) for w in caught] == [expected]


def test_a_vector_nifti_is_refused_from_its_header_without_crashing(tmp_path):
    """ITK's region read of a vector NIfTI segfaults; run medfm in a subprocess so a crash cannot take pytest down."""
    import subprocess
    import sys

    nib = pytest.importorskip("nibabel")
    image = nib.Nifti1Image(np.random.default_rng(0).normal(size=(20, 20, 20, 1, 3)).astype(np.float32), np.eye(4))
    image.header.set_intent("vector")
    nib.save(image, tmp_path / "vector.nii.gz")
    pd.DataFrame({"image_path": ["vector.nii.gz"] * 2, "coordX": [-5.0, -6.0], "coordY": [-5.0, -6.0], "coordZ": [5.0, 6.0]}).to_csv(
        tmp_path / "m.csv", index=False
    )  # fmt: skip
    reason = "expected one value per voxel, got 3 (a vector or RGB image); give a scalar volume"
    for extra in ([], ["--on-error", "skip"]):
        run = subprocess.run(
            [sys.executable, "-m", "medfm.cli", "crop", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out"), "--quiet", *extra],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if extra:
            assert run.returncode == 0, run.stderr
            errors = pd.read_csv(tmp_path / "out" / "patches.errors.csv")
            assert errors["reason"].tolist() == [reason, reason]
        else:
            assert run.returncode == 2, run.stderr
            assert (
                run.stderr.strip()
                .splitlines()[-1]
                .endswith(f"row 0 (image_path={tmp_path / 'vector.nii.gz'}): {reason}")
            )


def test_the_hounsfield_warning_says_what_it_saw(tmp_path):
    """A HU scan whose patch is all soft tissue is not called 8-bit: the warning names the region it judged; an
    8-bit file is named by its voxel type."""
    import warnings

    from medfm.data.datasets import iter_volume_items
    from medfm.data.io import Geometry, write_volume

    geometry = Geometry((120, 120, 120), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    hu = np.full((120, 120, 120), -1000, np.int16)
    hu[:70, :70, :70] = 40  # soft tissue all round the seed, air far from it
    hu[30, 30, 30] = 60
    for name, array in (("hu.nii.gz", hu), ("u8.nii.gz", np.clip(hu, 0, 255).astype(np.uint8))):
        write_volume(array, geometry, tmp_path / name)
        pd.DataFrame({"image_path": [name], "coordX": [30.0], "coordY": [30.0], "coordZ": [30.0]}).to_csv(
            tmp_path / "m.csv", index=False
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            (item,) = iter_volume_items(read_manifest(tmp_path / "m.csv"), FMCIB)
        assert item.rows == [0]
        messages = [str(w.message) for w in caught if "HU" in str(w.message)]
        expects = "profile fmcib expects CT in HU (air about -1000)"
        if name == "hu.nii.gz":
            assert messages == [
                f"the {53**3} voxels read around the seeds (not the whole scan) span 40..60, like a windowed 8-bit image "
                f"rather than Hounsfield units; {expects} (first seen in {tmp_path / name})"
            ]
        else:
            assert messages == [
                f"voxels are stored as 8-bit (uint8, 40..60), not Hounsfield units; {expects} (first seen in {tmp_path / name})"
            ]
