"""``crop_manifest`` and ``medfm crop``: patches in manifest order, bad rows skipped or raised, NIfTI copies."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket

import numpy as np
import pandas as pd
import pytest

from medfm.cli import main
from medfm.data.crop import crop_manifest
from medfm.data.io import read_volume
from medfm.data.manifest import read_manifest
from medfm.data.outputs import output_lock
from medfm.data.patches import crop_patch, plan_patch
from medfm.data.profiles import FMCIB
from medfm.data.synthetic import LESION_KINDS, make_demo_dataset
from medfm.errors import OutputError, RowError


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Two synthetic patients, four lesions each: the manifest path and the expected patch of every row."""
    folder = tmp_path_factory.mktemp("demo")
    manifest_path = make_demo_dataset(folder, n_patients=2)
    manifest = read_manifest(manifest_path)
    volumes = {p: read_volume(p) for p in dict.fromkeys(manifest.paths)}
    expected = np.stack(
        [crop_patch(volumes[manifest.paths[r]], manifest.seeds_lps[r], FMCIB) for r in range(len(manifest))]
    )
    return manifest_path, expected


def _bad_manifest(manifest_path, folder):
    """The demo manifest with a NaN coordZ in row 2 and a missing image in row 5."""
    table = pd.read_csv(manifest_path)
    table["image_path"] = [str(manifest_path.parent / p) for p in table["image_path"]]
    table.loc[2, "coordZ"] = np.nan
    table.loc[5, "image_path"] = str(folder / "images" / "gone.nii.gz")
    path = folder / "bad.csv"
    table.to_csv(path, index=False)
    return path


def test_crop_writes_patches_index_and_nifti(tmp_path, demo):
    manifest_path, expected = demo
    manifest = read_manifest(manifest_path)
    assert len(manifest) == 8 and manifest.row_errors == {}
    result = crop_manifest(manifest, "fmcib", tmp_path / "out", nifti=True, num_workers=0, progress=False)

    assert result.n_written == 8
    assert result.errors == {} and result.errors_file is None
    assert not (tmp_path / "out" / "patches.errors.csv").exists()
    patches = np.load(result.patches)
    assert patches.shape == (8, 1, 50, 50, 50)
    assert patches.dtype == np.float32
    np.testing.assert_allclose(patches, expected, rtol=0, atol=1e-6)  # row r holds the patch of manifest row r
    assert len({patches[i].tobytes() for i in range(8)}) == 8

    index = pd.read_csv(result.index)
    assert index["row"].tolist() == list(range(8))
    assert index["patch_index"].tolist() == list(range(8))
    assert index["lesion_type"].tolist() == list(LESION_KINDS) * 2
    assert index["patient_id"].tolist() == ["P000"] * 4 + ["P001"] * 4
    np.testing.assert_allclose(index[["coordX", "coordY", "coordZ"]].to_numpy(), manifest.seeds_lps)

    sidecar = json.loads((tmp_path / "out" / "crop.json").read_text())
    assert sidecar["profile"]["name"] == "fmcib"
    assert sidecar["coords"] == "lps"
    assert not list((tmp_path / "out").glob(".*"))  # no staging or temporary files left

    nifti = sorted(result.nifti_dir.iterdir())
    assert [p.name for p in nifti] == [f"row_{r:06d}.nii.gz" for r in range(8)]
    for row in (0, 5):
        volume = read_volume(nifti[row])
        assert volume.geometry.size == (50, 50, 50)
        assert volume.geometry.spacing == (1.0, 1.0, 1.0)
        assert volume.array.dtype == np.float32
        np.testing.assert_array_equal(volume.array, patches[row, 0])
        # The NIfTI lies where the patch was cut: its centre voxel is within a voxel of the seed.
        seed = manifest.seeds_lps[row]
        np.testing.assert_allclose(
            volume.geometry.origin,
            plan_patch(read_volume(manifest.paths[row]).geometry, seed, FMCIB).geometry.origin,
            atol=1e-4,
        )
        centre = volume.geometry.index_to_world(np.array([25.0, 25.0, 25.0]))
        assert np.all(np.abs(centre - seed) <= 1.0 + 1e-4)


def test_crop_skips_bad_rows(tmp_path, demo):
    manifest_path, expected = demo
    manifest = read_manifest(_bad_manifest(manifest_path, tmp_path))
    result = crop_manifest(manifest, FMCIB, tmp_path / "out", on_error="skip", progress=False)

    good = [0, 1, 3, 4, 6, 7]
    assert result.n_written == 6
    patches = np.load(result.patches)
    assert patches.shape == (6, 1, 50, 50, 50)
    np.testing.assert_allclose(patches, expected[good], rtol=0, atol=1e-6)
    index = pd.read_csv(result.index)
    assert index["row"].tolist() == good
    assert index["patch_index"].tolist() == list(range(6))

    assert sorted(result.errors) == [2, 5]
    assert result.errors_file == tmp_path / "out" / "patches.errors.csv"
    errors = pd.read_csv(result.errors_file)
    assert list(errors.columns) == ["row", *manifest.table.columns, "reason"]
    assert errors["row"].tolist() == [2, 5]
    assert errors["reason"].tolist() == ["column coordZ has value nan, not a finite number", "file not found"]
    assert errors["lesion_type"].tolist() == ["cystic", "part-solid"]
    assert errors["image_path"].iloc[1].endswith("gone.nii.gz")
    assert np.isnan(errors["coordZ"].iloc[0])

    # A clean rerun into the same folder removes the stale errors file.
    clean = crop_manifest(read_manifest(manifest_path), FMCIB, tmp_path / "out", on_error="skip", progress=False)
    assert clean.errors_file is None and not (tmp_path / "out" / "patches.errors.csv").exists()
    assert np.load(clean.patches).shape == (8, 1, 50, 50, 50)


def test_crop_pads_a_seed_just_outside_and_says_so(tmp_path, demo):
    manifest_path, expected = demo
    table = pd.read_csv(manifest_path)
    table["image_path"] = [str(manifest_path.parent / p) for p in table["image_path"]]
    geometry = read_volume(table.loc[3, "image_path"]).geometry
    index = geometry.world_to_index(table.loc[3, ["coordX", "coordY", "coordZ"]].to_numpy(dtype=float))
    index[2] = geometry.size[2] - 0.5 + 4.0 / geometry.spacing[2]  # 4 mm above the top slice
    table.loc[3, ["coordX", "coordY", "coordZ"]] = geometry.index_to_world(index)
    path = tmp_path / "border.csv"
    table.to_csv(path, index=False)
    manifest = read_manifest(path)

    result = crop_manifest(manifest, "fmcib", tmp_path / "out", progress=False)
    patches = np.load(result.patches)
    index_table = pd.read_csv(result.index, keep_default_na=False)
    assert index_table["row"].tolist() == list(range(8))
    warned = index_table["warnings"].tolist()
    assert warned[:3] + warned[4:] == [""] * 7
    assert warned[3].startswith("seed (") and "lies 4.0 mm outside the volume" in warned[3]
    np.testing.assert_allclose(patches[3], crop_patch(read_volume(manifest.paths[3]), manifest.seeds_lps[3], FMCIB))
    np.testing.assert_allclose(patches[[0, 1, 2, 4]], expected[[0, 1, 2, 4]], atol=1e-6)

    centred = crop_manifest(manifest, "fmcib-centred", tmp_path / "c", on_error="skip", progress=False)
    assert list(centred.errors) == [3] and "4.0 mm outside the volume" in centred.errors[3]
    assert "warnings" not in pd.read_csv(centred.index).columns


def test_crop_skips_an_unreadable_volume(tmp_path, demo):
    """A file that exists but is cut short fails when read: all its rows are skipped with the reason."""
    manifest_path, expected = demo
    table = pd.read_csv(manifest_path)
    (tmp_path / "images").mkdir()
    data = (manifest_path.parent / "images" / "patient_001.nii.gz").read_bytes()
    (tmp_path / "images" / "patient_001.nii.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "images" / "patient_000.nii.gz").write_bytes(
        (manifest_path.parent / "images" / "patient_000.nii.gz").read_bytes()
    )
    table.to_csv(tmp_path / "m.csv", index=False)
    manifest = read_manifest(tmp_path / "m.csv")
    assert manifest.row_errors == {}
    result = crop_manifest(manifest, FMCIB, tmp_path / "out", on_error="skip", progress=False)
    assert result.n_written == 4
    np.testing.assert_allclose(np.load(result.patches), expected[:4], rtol=0, atol=1e-6)
    assert sorted(result.errors) == [4, 5, 6, 7]
    assert all("truncated" in reason for reason in result.errors.values())


def test_crop_raises_on_the_first_bad_row(tmp_path, demo):
    manifest_path, _ = demo
    manifest = read_manifest(_bad_manifest(manifest_path, tmp_path))
    with pytest.raises(RowError, match=r"^row 2 \(image_path=.*patient_000\.nii\.gz\): column coordZ") as info:
        crop_manifest(manifest, FMCIB, tmp_path / "out", on_error="raise", progress=False)
    assert info.value.row == 2
    assert not (tmp_path / "out" / "patches.npy").exists()
    assert not list((tmp_path / "out").glob(".*"))


def test_cli_crop(tmp_path, demo, capsys):
    manifest_path, expected = demo
    out = tmp_path / "cli"
    assert main(["crop", str(manifest_path), "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "wrote 8 patches" in captured.out
    np.testing.assert_allclose(np.load(out / "patches.npy"), expected, rtol=0, atol=1e-6)


def test_cli_crop_skip_reports_bad_rows(tmp_path, demo, capsys):
    manifest_path, expected = demo
    bad = _bad_manifest(manifest_path, tmp_path)
    out = tmp_path / "cli"
    assert main(["crop", str(bad), "--out", str(out), "--quiet", "--on-error", "skip", "--workers", "0"]) == 0
    captured = capsys.readouterr()
    assert "wrote 6 patches" in captured.out
    assert f"2 bad rows in {out / 'patches.errors.csv'}" in captured.out
    assert np.load(out / "patches.npy").shape == (6, 1, 50, 50, 50)


def test_cli_bad_row_exits_2_with_one_line(tmp_path, demo, capsys):
    manifest_path, _ = demo
    bad = _bad_manifest(manifest_path, tmp_path)
    assert main(["crop", str(bad), "--out", str(tmp_path / "cli"), "--quiet", "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("medfm: error: row 2 (image_path=")


def test_cli_bad_manifest_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "m.csv"
    pd.DataFrame({"image_path": ["a.nii.gz"], "coordX": [1.0], "coordY": [2.0]}).to_csv(path, index=False)
    assert main(["crop", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("medfm: error:")
    assert "missing column(s) ['coordZ']" in err[0]
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- damaged inputs


def test_crop_refuses_a_gapped_series_and_reads_it_by_position_when_asked(tmp_path, capsys):
    from test_io import BROKEN, EVEN, HINT, SERIES_UID, write_stack

    gapped = write_stack(tmp_path / "gapped", BROKEN["gap"][0])
    full = write_stack(tmp_path / "full", EVEN)  # the same scan with the missing slice present
    seeds = [(-4.0, -3.0, 27.5), (-6.0, -1.0, 31.0)]  # the second next to the missing slice (z = 27.5)
    table = pd.DataFrame({"image_path": ["gapped", "gapped"], **{c: [s[k] for s in seeds] for k, c in enumerate(("coordX", "coordY", "coordZ"))}})  # fmt: skip
    table.to_csv(tmp_path / "m.csv", index=False)
    manifest = read_manifest(tmp_path / "m.csv")
    reason = f"series {SERIES_UID}: {BROKEN['gap'][1]}{HINT} (irregular_series='resample')"
    with pytest.raises(RowError) as info:
        crop_manifest(manifest, FMCIB, tmp_path / "refused", progress=False)
    assert str(info.value) == f"row 0 (image_path={gapped}): {reason}"
    result = crop_manifest(manifest, FMCIB, tmp_path / "skipped", on_error="skip", progress=False)
    assert result.n_written == 0 and result.errors == {0: reason, 1: reason}
    rc = main(["crop", str(tmp_path / "m.csv"), "--out", str(tmp_path / "cli"), "--quiet"])
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"row 0 (image_path={gapped}): {reason}")

    result = crop_manifest(manifest, FMCIB, tmp_path / "resampled", irregular_series="resample", progress=False)
    whole = read_volume(full)
    np.testing.assert_allclose(
        np.load(result.patches), np.stack([crop_patch(whole, s, FMCIB) for s in seeds]), rtol=0, atol=1e-6
    )
    index = pd.read_csv(result.index)
    flag = f"read anyway: series {SERIES_UID}: {BROKEN['gap'][1]}; slices interpolated by position"
    assert index["warnings"].tolist() == [flag, flag]


def test_a_second_crop_into_the_same_folder_is_refused_while_the_first_runs(tmp_path, demo):
    manifest_path, expected = demo
    out = tmp_path / "out"
    out.mkdir()
    other = out / ".patches.staging.npy"  # the staging file of another run (the name medfm once fixed)
    other.write_bytes(b"another run's patches")
    with output_lock(out / "patches.npy"):  # as a crop running in another process holds it
        with pytest.raises(OutputError) as info:
            crop_manifest(read_manifest(manifest_path), "fmcib", out, num_workers=0, progress=False)
        assert str(info.value) == (
            f"{out / 'patches.npy'} is being written by process {os.getpid()} on {socket.gethostname()} "
            f"(since {json.loads((out / '.patches.npy.lock').read_text())['started']}); wait for it to finish, "
            f"or remove {out / '.patches.npy.lock'} if it is gone"
        )
    result = crop_manifest(read_manifest(manifest_path), "fmcib", out, num_workers=0, progress=False)
    np.testing.assert_allclose(np.load(result.patches), expected, atol=1e-6)
    assert other.read_bytes() == b"another run's patches"  # its staging file untouched: staging names are unique
    assert sorted(p.name for p in out.iterdir()) == [".patches.staging.npy", "crop.json", "index.csv", "patches.npy"]


def test_disk_full_while_cropping_is_one_line_and_leaves_no_staging_file(tmp_path, demo, monkeypatch):
    manifest_path, _ = demo
    out = tmp_path / "out"

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OutputError) as info:
        crop_manifest(read_manifest(manifest_path), "fmcib", out, num_workers=0, progress=False)
    assert str(info.value) == f"cannot write {out / 'patches.npy'}: the disk is full; it needs 4.0 MB"  # 8 × 50³ × 4
    assert list(out.iterdir()) == []  # no staging file, no lock


def test_crop_checks_free_space_and_the_output_before_the_work(tmp_path, demo, monkeypatch):
    manifest_path, _ = demo
    manifest = read_manifest(manifest_path)
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    with pytest.raises(OutputError, match=r"^--out .*taken is a file; name a folder to write$"):
        crop_manifest(manifest, "fmcib", a_file, num_workers=0, progress=False)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1_000_000))
    with pytest.raises(OutputError, match=r"patches\.npy: it needs 4\.0 MB, the disk has 1\.0 MB free$"):
        crop_manifest(manifest, "fmcib", tmp_path / "out", num_workers=0, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_crop_refuses_manifest_columns_it_writes_itself(tmp_path, demo):
    manifest_path, _ = demo
    table = pd.read_csv(manifest_path)
    table.insert(0, "patch_index", range(len(table)))
    path = manifest_path.parent / "with_index.csv"
    table.to_csv(path, index=False)
    with pytest.raises(OutputError) as info:
        crop_manifest(read_manifest(path), "fmcib", tmp_path / "out", num_workers=0, progress=False)
    assert str(info.value) == (
        f"manifest {path}: column 'patch_index' is one medfm writes itself; rename it in the manifest"
    )
