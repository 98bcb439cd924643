"""Manifests: columns checked, paths resolved, seeds converted once, bad rows collected with a reason."""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from medfm.data.io import Geometry, write_volume
from medfm.data.manifest import read_manifest, validate_manifest
from medfm.errors import ManifestError

GEOMETRY = Geometry(
    size=(20, 16, 12),
    spacing=(0.75, 1.25, 2.5),
    origin=(-30.5, 14.25, -80.0),
    direction=(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
)


@pytest.fixture
def images(tmp_path):
    """Two small volumes: one under the manifest's folder, one elsewhere (named by absolute path)."""
    (tmp_path / "study" / "images").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    array = np.zeros(GEOMETRY.size[::-1], np.int16)
    rel = write_volume(array, GEOMETRY, tmp_path / "study" / "images" / "a.nii.gz")
    absolute = write_volume(array, GEOMETRY, tmp_path / "elsewhere" / "b.nrrd")
    return rel, absolute


def _write_csv(path, rows, header):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


HEADER = ["image_path", "coordX", "coordY", "coordZ", "patient_id", "label", "note"]


def _rows(absolute):
    return [
        ["images/a.nii.gz", "1.5", "-2.25", "3", "007", "1", "first"],
        [str(absolute), "-4", "5.5", "-6.125", "010", "0", ""],
        ["images/a.nii.gz", "7", "8", "9", "007", "1", "third"],
    ]


def test_csv_paths_seeds_and_extra_columns(tmp_path, images):
    rel, absolute = images
    manifest_path = _write_csv(tmp_path / "study" / "manifest.csv", _rows(absolute), HEADER)
    m = read_manifest(manifest_path)

    assert len(m) == 3
    assert m.row_errors == {}
    assert m.coords == "lps"
    assert m.source == str(manifest_path)
    assert m.paths == [str(rel.resolve()), str(absolute), str(rel.resolve())]
    np.testing.assert_array_equal(m.seeds_lps, [[1.5, -2.25, 3.0], [-4.0, 5.5, -6.125], [7.0, 8.0, 9.0]])

    # Extra columns travel untouched: IDs with leading zeros stay text, labels become numbers.
    assert list(m.table.columns) == HEADER
    assert m.table["patient_id"].tolist() == ["007", "010", "007"]
    assert m.table["label"].tolist() == [1, 0, 1]
    assert pd.api.types.is_integer_dtype(m.table["label"])
    assert m.table["note"].iloc[0] == "first"
    assert pd.isna(m.table["note"].iloc[1])
    # image_path in the table is the text as given, the resolved one is in paths.
    assert m.table["image_path"].iloc[0] == "images/a.nii.gz"


def test_parquet_manifest(tmp_path, images):
    rel, absolute = images
    table = pd.DataFrame(
        {
            "image_path": ["images/a.nii.gz", str(absolute)],
            "coordX": [1.5, -4.0],
            "coordY": [-2.25, 5.5],
            "coordZ": [3.0, -6.125],
            "patient_id": ["007", "010"],
            "label": [1, 0],
            "weight": [0.25, 2.5],
        }
    )
    path = tmp_path / "study" / "manifest.parquet"
    table.to_parquet(path, index=False)
    m = read_manifest(path)

    assert m.row_errors == {}
    assert m.paths == [str(rel.resolve()), str(absolute)]
    np.testing.assert_array_equal(m.seeds_lps, [[1.5, -2.25, 3.0], [-4.0, 5.5, -6.125]])
    assert m.table["patient_id"].tolist() == ["007", "010"]
    assert m.table["label"].tolist() == [1, 0]
    assert m.table["weight"].tolist() == [0.25, 2.5]


@pytest.mark.parametrize("missing", ["image_path", "coordX", "coordZ"])
def test_missing_required_column_raises(tmp_path, images, missing):
    _, absolute = images
    keep = [i for i, c in enumerate(HEADER) if c != missing]
    rows = [[r[i] for i in keep] for r in _rows(absolute)]
    path = _write_csv(tmp_path / "study" / "m.csv", rows, [HEADER[i] for i in keep])
    with pytest.raises(ManifestError, match=rf"missing column\(s\) \['{missing}'\]") as info:
        read_manifest(path)
    assert str(path) in str(info.value)


def test_unreadable_or_empty_manifest_raises(tmp_path):
    with pytest.raises(ManifestError, match="file not found"):
        read_manifest(tmp_path / "nope.csv")
    empty = _write_csv(tmp_path / "empty.csv", [], HEADER)
    with pytest.raises(ManifestError, match="has no rows"):
        read_manifest(empty)
    with pytest.raises(ManifestError, match="coords='mm'"):
        read_manifest(empty, coords="mm")


def test_bad_rows_are_collected_with_a_reason(tmp_path, images):
    _, absolute = images
    rows = [
        ["images/a.nii.gz", "1", "2", "3", "001", "1", ""],
        ["images/a.nii.gz", "1", "", "3", "002", "1", ""],  # empty coordY → NaN
        ["images/missing.nii.gz", "1", "2", "3", "003", "0", ""],
        ["", "1", "2", "3", "004", "0", ""],
        [str(absolute), "4", "5", "6", "005", "1", ""],
    ]
    m = read_manifest(_write_csv(tmp_path / "study" / "m.csv", rows, HEADER))
    assert sorted(m.row_errors) == [1, 2, 3]
    assert m.row_errors[1] == "column coordY has value nan, not a finite number"
    assert m.row_errors[2] == "file not found"
    assert m.row_errors[3] == "column image_path is empty"
    assert np.isnan(m.seeds_lps[1, 1])
    np.testing.assert_array_equal(m.seeds_lps[4], [4.0, 5.0, 6.0])


def test_text_in_a_coordinate_column_is_a_row_error(tmp_path, images):
    rows = [
        ["images/a.nii.gz", "1", "2", "3", "001", "1", ""],
        ["images/a.nii.gz", "abc", "2", "3", "002", "1", ""],
        ["images/a.nii.gz", "1", "2", "inf", "003", "1", ""],
    ]
    m = read_manifest(_write_csv(tmp_path / "study" / "m.csv", rows, HEADER))
    assert m.row_errors == {
        1: "column coordX has value 'abc', not a finite number",
        2: "column coordZ has value 'inf', not a finite number",
    }
    np.testing.assert_array_equal(m.seeds_lps[0], [1.0, 2.0, 3.0])


def test_ras_coordinates_negate_x_and_y(tmp_path, images):
    _, absolute = images
    path = _write_csv(tmp_path / "study" / "m.csv", _rows(absolute), HEADER)
    lps = read_manifest(path).seeds_lps
    ras = read_manifest(path, coords="ras")
    assert ras.coords == "ras"
    np.testing.assert_array_equal(ras.seeds_lps, lps * np.array([-1.0, -1.0, 1.0]))
    np.testing.assert_array_equal(ras.seeds_lps[0], [-1.5, 2.25, 3.0])


def test_voxel_coordinates_use_the_file_header(tmp_path, images):
    rel, absolute = images
    oblique = Geometry(
        size=(10, 12, 14),
        spacing=(0.7, 1.3, 2.9),
        origin=(11.1, -22.2, 33.3),
        direction=(0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0),
    )
    third = write_volume(np.zeros((14, 12, 10), np.int16), oblique, tmp_path / "study" / "c.mha")
    index = [(3.0, 4.0, 5.0), (0.5, 10.25, 2.0), (9.0, 0.0, 13.0), (1.0, 2.0, 3.5)]
    rows = [
        ["images/a.nii.gz", *map(str, index[0]), "001", "1", ""],
        [str(absolute), *map(str, index[1]), "002", "1", ""],
        ["c.mha", *map(str, index[2]), "003", "1", ""],
        ["images/gone.nii.gz", *map(str, index[3]), "004", "1", ""],
    ]
    m = read_manifest(_write_csv(tmp_path / "study" / "m.csv", rows, HEADER), coords="voxel")
    assert m.row_errors == {3: "file not found"}
    for row, path in enumerate([rel, absolute, third]):
        image = sitk.ReadImage(str(path))
        expected = image.TransformContinuousIndexToPhysicalPoint(index[row])
        np.testing.assert_allclose(m.seeds_lps[row], expected, rtol=0, atol=1e-6)
    assert np.all(np.isnan(m.seeds_lps[3]))
    # The flipped x axis of a.nii.gz: index 3 lies 3 × 0.75 mm to the right (smaller LPS x) of the origin.
    np.testing.assert_allclose(m.seeds_lps[0], (-30.5 - 2.25, 14.25 + 5.0, -80.0 + 12.5), atol=1e-6)


def test_voxel_coordinates_of_an_unreadable_file_are_a_row_error(tmp_path):
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    rows = [["junk.nii.gz", "1", "2", "3", "001", "1", ""]]
    m = read_manifest(_write_csv(tmp_path / "m.csv", rows, HEADER), coords="voxel")
    assert m.row_errors == {0: "header cannot be read"}


def test_volumes_group_rows_in_order_of_first_appearance(tmp_path, images):
    rel, absolute = images
    names = ["images/a.nii.gz", str(absolute), "images/a.nii.gz", str(absolute), "images/a.nii.gz"]
    rows = [[n, "1", "2", "3", f"{i:03d}", "1", ""] for i, n in enumerate(names)]
    # The first row names b, so b's group comes first.
    rows = [[str(absolute), "0", "0", "0", "999", "0", ""], *rows]
    m = read_manifest(_write_csv(tmp_path / "study" / "m.csv", rows, HEADER))
    assert m.volumes() == [(str(absolute), None, [0, 2, 4]), (str(rel.resolve()), None, [1, 3, 5])]
    assert m.volumes([5, 1, 2]) == [(str(rel.resolve()), None, [5, 1]), (str(absolute), None, [2])]


def test_series_uid_column_splits_groups(tmp_path):
    table = pd.DataFrame(
        {
            "image_path": ["dcm", "dcm", "dcm", "dcm"],
            "coordX": [0.0, 1.0, 2.0, 3.0],
            "coordY": [0.0] * 4,
            "coordZ": [0.0] * 4,
            "series_uid": ["1.2", "1.3", None, "1.2"],
        }
    )
    m = validate_manifest(table, source="mem", base_dir=tmp_path)
    folder = str(tmp_path / "dcm")
    assert m.volumes() == [(folder, "1.2", [0, 3]), (folder, "1.3", [1]), (folder, None, [2])]
    assert m.series_uid(2) is None
    assert m.series_uid(1) == "1.3"


def test_published_fmcib_luna16_csv(need_shared):
    path = need_shared("fmcib_task_annotations", "luna16_task2_train.csv")
    with open(path, newline="") as f:
        text_rows = list(csv.DictReader(f))
    m = read_manifest(path)

    assert len(m) == len(text_rows) == 338
    assert list(m.table.columns) == ["Unnamed: 0", "malignancy", "coordX", "coordY", "coordZ", "image_path"]
    # The LUNA16 images are not shipped: every row is "file not found", none is dropped.
    assert m.row_errors == {row: "file not found" for row in range(338)}
    assert all(p.startswith("/mnt/data1/datasets/LUNA16_v2/") for p in m.paths)
    assert pd.api.types.is_integer_dtype(m.table["malignancy"])
    assert m.table["malignancy"].tolist() == [int(r["malignancy"]) for r in text_rows]
    assert set(m.table["malignancy"]) == {0, 1}
    expected = np.array([[float(r[c]) for c in ("coordX", "coordY", "coordZ")] for r in text_rows])
    np.testing.assert_array_equal(m.seeds_lps, expected)
    np.testing.assert_array_equal(m.seeds_lps[0], [100.546875, -2.3062439999999924, -129.25])


def test_parquet_non_finite_coordinates_are_row_errors(tmp_path, images):
    table = pd.DataFrame(
        {
            "image_path": ["images/a.nii.gz"] * 3,
            "coordX": [1.0, np.nan, 3.0],
            "coordY": [1.0, 2.0, -np.inf],
            "coordZ": [1.0, 2.0, 3.0],
        }
    )
    path = tmp_path / "study" / "m.parquet"
    table.to_parquet(path, index=False)
    m = read_manifest(path)
    assert m.row_errors == {
        1: "column coordX has value nan, not a finite number",
        2: "column coordY has value -inf, not a finite number",
    }


# ------------------------------------------------------------------------------------------- damaged inputs


def test_boolean_and_other_non_numeric_coordinate_columns_are_refused_with_their_dtype(tmp_path, images):
    rel, _ = images
    base = {"image_path": [str(rel)] * 2, "coordX": [1.0, 2.0], "coordY": [1.0, 2.0], "coordZ": [1.0, 2.0]}
    cases = {
        "bool": ([True, False], "column coordY holds booleans (dtype bool), not coordinates"),
        "object bool": (pd.Series([True, 1.5], dtype=object), "column coordY holds booleans (dtype object), not coordinates"),
        "datetime": (pd.to_datetime(["2024-01-01", "2024-01-02"]), "column coordY has dtype {dtype}, not numbers"),
    }  # fmt: skip
    for name, (values, reason) in cases.items():
        table = pd.DataFrame({**base, "coordY": values})
        path = tmp_path / f"{name}.parquet"
        with pytest.raises(ManifestError) as info:
            if name == "object bool":  # what pandas gives for a mixed column (Parquet cannot hold one)
                validate_manifest(table, str(path), tmp_path)
            else:
                table.to_parquet(path)
                read_manifest(path)
        dtype = pd.read_parquet(path)["coordY"].dtype if path.exists() else None
        assert str(info.value) == f"manifest {path}: {reason.format(dtype=dtype)}", name


def test_decimal_commas_name_the_file_column_and_row(tmp_path, images):
    rel, _ = images
    path = _write_csv(tmp_path / "comma.csv", [[str(rel), "1.5", "2", "3"], [str(rel), "0,640", "2", "3"], [str(rel), "-1,5", "2", "3"]], ["image_path", "coordX", "coordY", "coordZ"])  # fmt: skip
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert str(info.value) == (
        f"manifest {path}: column coordX, row 1 holds '0,640' (2 rows like it): decimal commas are not read; "
        "write decimal points (0.640), with commas only between columns"
    )


@pytest.mark.parametrize(
    ("coords", "seed", "named"),
    [
        ("lps", (500.0, 20.0, -70.0), "seed (500.0, 20.0, -70.0) mm"),
        ("ras", (-500.0, -20.0, -70.0), "seed (-500.0, -20.0, -70.0) mm RAS (LPS (500.0, 20.0, -70.0))"),
        ("voxel", (-700.0, 2.0, 3.0), "seed at voxel (-700.0, 2.0, 3.0) (LPS (494.5, 16.8, -72.5) mm)"),
    ],
)
def test_a_seed_outside_the_volume_is_named_as_the_user_gave_it(tmp_path, images, coords, seed, named):
    from medfm.data.datasets import VolumePatches
    from medfm.data.profiles import FMCIB

    rel, _ = images
    path = _write_csv(tmp_path / "m.csv", [[str(rel), *seed]], ["image_path", "coordX", "coordY", "coordZ"])
    item = VolumePatches(read_manifest(path, coords=coords), FMCIB)[0]
    assert list(item.errors) == [0]
    assert item.errors[0].startswith(f"{named} lies ")
    assert item.errors[0].endswith(" mm outside the volume: its 50×50×50 box does not reach the volume")
