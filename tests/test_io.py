"""Volume reading and writing keeps the exact geometry; unreadable inputs raise VolumeError naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from medfm.data.io import (
    Geometry,
    dicom_series,
    dicom_stack,
    read_geometry,
    read_stack_region,
    read_volume,
    write_volume,
)
from medfm.data.manifest import read_manifest
from medfm.errors import VolumeError

FLIP_X = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# A proper rotation that permutes the axes (x→y, y→z, z→x), exact in every format.
PERMUTED = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

# NIfTI stores spacing and origin as float32: these odd values are exact there.
F32_SPACING = (0.6875, 1.3125, 2.875)
F32_ORIGIN = (12.5, -7.25, 100.125)
# NRRD and MHA write decimal text: any double survives.
DEC_SPACING = (0.7, 1.3, 2.9)
DEC_ORIGIN = (12.3, -7.7, 100.1)

DICOM_CT = ("totalsegmentator_example", "example_ct_dicom")


def _array(size_xyz, dtype=np.int16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(-1024, 3000, size=size_xyz[::-1]).astype(dtype)


@pytest.mark.parametrize(
    ("suffix", "spacing", "origin"),
    [
        (".nii", F32_SPACING, F32_ORIGIN),
        (".nii.gz", F32_SPACING, F32_ORIGIN),
        (".nrrd", DEC_SPACING, DEC_ORIGIN),
        (".mha", DEC_SPACING, DEC_ORIGIN),
    ],
)
@pytest.mark.parametrize("direction", [FLIP_X, PERMUTED], ids=["flip-x", "permuted"])
def test_round_trip_keeps_geometry_and_voxels(tmp_path, suffix, spacing, origin, direction):
    geometry = Geometry(size=(20, 16, 12), spacing=spacing, origin=origin, direction=direction)
    array = _array(geometry.size)
    path = write_volume(array, geometry, tmp_path / f"vol{suffix}")

    volume = read_volume(path)
    assert volume.geometry == geometry
    assert volume.geometry.spacing == spacing  # exact, not approximately
    assert volume.geometry.origin == origin
    assert volume.geometry.direction == direction
    assert volume.array.dtype == np.int16
    assert volume.array.shape == (12, 16, 20)
    np.testing.assert_array_equal(volume.array, array)
    assert volume.path == str(path)

    header = read_geometry(path)
    assert header == volume.geometry
    assert isinstance(header.size[0], int)


def test_nifti_keeps_spacing_only_to_float32(tmp_path):
    """A format limit worth knowing: NIfTI rounds 0.7 mm to the nearest float32."""
    geometry = Geometry(size=(4, 4, 4), spacing=DEC_SPACING, origin=F32_ORIGIN, direction=FLIP_X)
    path = write_volume(np.zeros((4, 4, 4), np.int16), geometry, tmp_path / "v.nii.gz")
    got = read_geometry(path)
    assert got.spacing == tuple(float(np.float32(s)) for s in DEC_SPACING)
    assert got.spacing != DEC_SPACING


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_round_trip_keeps_dtype(tmp_path, dtype):
    geometry = Geometry(size=(5, 6, 7), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=FLIP_X)
    array = (np.arange(5 * 6 * 7).reshape(7, 6, 5) % 200).astype(dtype)
    volume = read_volume(write_volume(array, geometry, tmp_path / "v.nrrd"))
    assert volume.array.dtype == dtype
    np.testing.assert_array_equal(volume.array, array)


def test_index_world_mapping_matches_simpleitk():
    image = sitk.Image(30, 20, 10, sitk.sitkInt16)
    image.SetSpacing((0.7, 1.3, 2.9))
    image.SetOrigin((12.3, -7.7, 100.1))
    c, s = np.cos(0.3), np.sin(0.3)
    oblique = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([-1.0, 1.0, 1.0])
    image.SetDirection(tuple(oblique.ravel()))
    geometry = Geometry.of_image(image)

    rng = np.random.default_rng(7)
    index = rng.uniform(-3.0, 33.0, size=(25, 3))
    index[0] = (0.0, 0.0, 0.0)
    index[1] = (29.0, 19.0, 9.0)
    expected = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(map(float, i))) for i in index])
    world = geometry.index_to_world(index)
    np.testing.assert_allclose(world, expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(world[0], (12.3, -7.7, 100.1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(geometry.world_to_index(world), index, rtol=0, atol=1e-9)
    # And against SimpleITK's inverse.
    back = np.array([image.TransformPhysicalPointToContinuousIndex(tuple(map(float, w))) for w in expected])
    np.testing.assert_allclose(geometry.world_to_index(expected), back, rtol=0, atol=1e-9)
    # One point as a plain (3,) vector works too.
    np.testing.assert_allclose(geometry.index_to_world(index[2]), expected[2], rtol=0, atol=1e-9)


@pytest.mark.parametrize("reader", [read_volume, read_geometry])
def test_missing_file_raises_volume_error(tmp_path, reader):
    path = tmp_path / "absent.nii.gz"
    with pytest.raises(VolumeError, match="file not found") as info:
        reader(path)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("keep", [0.97, 0.5, 0.1])
def test_truncated_nifti_raises_volume_error(tmp_path, small_ct, suffix, keep):
    """ITK fills the missing voxels of a cut NIfTI with 0; medfm must refuse such a file."""
    whole = write_volume(small_ct.array, small_ct.geometry, tmp_path / f"whole{suffix}")
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(VolumeError, match="truncated") as info:
        read_volume(cut)
    assert str(cut) in str(info.value)
    # The intact file still reads, voxel for voxel.
    np.testing.assert_array_equal(read_volume(whole).array, small_ct.array)


def test_uncompressed_nifti_named_nii_gz_still_reads(tmp_path, small_ct):
    """ITK reads a plain NIfTI whatever its suffix; the completeness check must look at the content, not the name."""
    plain = write_volume(small_ct.array, small_ct.geometry, tmp_path / "plain.nii")
    misnamed = tmp_path / "misnamed.nii.gz"
    misnamed.write_bytes(plain.read_bytes())
    np.testing.assert_array_equal(read_volume(misnamed).array, small_ct.array)
    misnamed.write_bytes(plain.read_bytes()[:-100])
    with pytest.raises(VolumeError, match="truncated"):
        read_volume(misnamed)


def test_nifti_cut_inside_header_raises_volume_error(tmp_path, small_ct):
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(small_ct.path.read_bytes()[:40])
    for reader in (read_volume, read_geometry):
        with pytest.raises(VolumeError) as info:
            reader(cut)
        assert str(cut) in str(info.value)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_truncated_mha_nrrd_raise_volume_error(tmp_path, small_ct, suffix):
    whole = write_volume(small_ct.array, small_ct.geometry, tmp_path / f"whole{suffix}")
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    with pytest.raises(VolumeError, match="cannot be read") as info:
        read_volume(cut)
    assert str(cut) in str(info.value)


@pytest.mark.parametrize("reader", [read_volume, read_geometry])
def test_2d_image_raises_volume_error(tmp_path, reader):
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 12), np.int16)), str(path))
    with pytest.raises(VolumeError, match="expected a 3D volume, got 2D") as info:
        reader(path)
    assert str(path) in str(info.value)


def test_vector_image_raises_volume_error(tmp_path):
    path = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True), str(path))
    with pytest.raises(VolumeError, match="one value per voxel, got 3"):
        read_volume(path)


def test_single_volume_4d_file_reads_as_3d(tmp_path):
    image = sitk.JoinSeries([sitk.GetImageFromArray(np.full((4, 5, 6), 7, np.int16))])
    assert image.GetDimension() == 4
    path = tmp_path / "four.nii.gz"
    sitk.WriteImage(image, str(path))
    volume = read_volume(path)
    assert volume.array.shape == (4, 5, 6)
    assert volume.geometry.size == (6, 5, 4)
    assert read_geometry(path) == volume.geometry


# ---------------------------------------------------------------------------------------------- real data


def _dicom_positions(folder):
    pydicom = pytest.importorskip("pydicom")
    return {f: pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(str(p) for p in folder.iterdir())}


def test_dicom_series_folder_reads_sorted_by_position(need_shared):
    pydicom = pytest.importorskip("pydicom")
    folder = need_shared(*DICOM_CT)
    headers = _dicom_positions(folder)
    z = sorted(float(h.ImagePositionPatient[2]) for h in headers.values())

    volume = read_volume(folder)
    g = volume.geometry
    assert g.size == (512, 512, 20)
    assert volume.array.shape == (20, 512, 512)
    assert volume.array.dtype == np.int16
    assert g.spacing == (0.9765625, 0.9765625, 2.0)
    assert g.origin == (-249.51171875, -437.51171875, -804.5)
    assert g.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    # The z origin is the lowest slice; the z spacing is the slice gap (2 mm), not the 3 mm slice thickness.
    assert g.origin[2] == z[0] == -804.5
    assert np.allclose(np.diff(z), 2.0)
    assert g.spacing[2] == z[1] - z[0]
    assert float(next(iter(headers.values())).SliceThickness) == 3.0
    assert read_geometry(folder) == g

    # Each array slice k holds the pixels of the file with the k-th lowest z (HU = raw + intercept).
    by_z = sorted(headers, key=lambda f: float(headers[f].ImagePositionPatient[2]))
    for k in (0, 9, 19):
        ds = pydicom.dcmread(by_z[k])
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        np.testing.assert_array_equal(volume.array[k], hu)
    assert not np.array_equal(volume.array[0], volume.array[19])


def test_dicom_folder_with_two_series(tmp_path, need_shared):
    pydicom = pytest.importorskip("pydicom")
    source = need_shared(*DICOM_CT)
    uid_a = "1.2.826.0.1.3680043.8.498.101"
    uid_b = "1.2.826.0.1.3680043.8.498.202"
    folder = tmp_path / "mixed"
    folder.mkdir()
    z_of = {}
    for i, f in enumerate(sorted(source.iterdir())):
        ds = pydicom.dcmread(f)
        uid = uid_a if i % 2 == 0 else uid_b
        ds.SeriesInstanceUID = uid
        ds.save_as(folder / f.name)
        z_of.setdefault(uid, []).append(float(ds.ImagePositionPatient[2]))

    series = dicom_series(folder)
    assert sorted(series) == [uid_a, uid_b]
    assert [len(series[uid_a]), len(series[uid_b])] == [10, 10]

    with pytest.raises(VolumeError) as info:
        read_volume(folder)
    message = str(info.value)
    assert str(folder) in message
    assert uid_a in message and uid_b in message
    assert "2 DICOM series" in message and "series_uid" in message

    for uid in (uid_a, uid_b):
        volume = read_volume(folder, series_uid=uid)
        assert volume.geometry.size == (512, 512, 10)
        assert volume.geometry.origin[2] == min(z_of[uid])
        assert volume.geometry.spacing[2] == 4.0  # every other slice
        assert read_geometry(folder, series_uid=uid) == volume.geometry
    # The two halves are different slices of the same scan.
    assert min(z_of[uid_a]) != min(z_of[uid_b])

    with pytest.raises(VolumeError, match="not found") as info:
        read_volume(folder, series_uid="1.2.3.4")
    assert uid_a in str(info.value)


def test_empty_folder_raises_volume_error(tmp_path):
    with pytest.raises(VolumeError, match="no DICOM series"):
        read_volume(tmp_path)


def test_lidc_nifti(need_shared):
    path = need_shared("lidc_idri_0001", "lidc_idri_0001_ct_uint8_1.4x1.4x2.5mm.nii.gz")
    volume = read_volume(path)
    g = volume.geometry
    assert g.size == (256, 256, 133)
    assert g.spacing == (1.40625, 1.40625, 2.5)
    assert g.origin == (0.0, 0.0, -340.0)
    assert g.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert volume.array.shape == (133, 256, 256)
    assert volume.array.dtype == np.uint8
    assert read_geometry(path) == g


def test_a_series_with_an_empty_uid_can_be_chosen(tmp_path, need_shared):
    pydicom = pytest.importorskip("pydicom")
    source = need_shared(*DICOM_CT)
    folder = tmp_path / "mixed"
    folder.mkdir()
    other = "1.2.826.0.1.3680043.8.498.303"
    for i, f in enumerate(sorted(source.iterdir())):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = "" if i < 8 else other
        ds.save_as(folder / f.name)
    with pytest.raises(VolumeError, match="<empty UID> \\(8 files\\)"):
        read_volume(folder)
    assert read_volume(folder, series_uid="").geometry.size[2] == 8
    assert read_volume(folder, series_uid=other).geometry.size[2] == 12
    assert dicom_stack(folder) is None  # two series and none chosen: read_image's error decides
    assert dicom_stack(folder, series_uid="").geometry.size[2] == 8
    assert dicom_stack(folder, series_uid=other).geometry == read_volume(folder, series_uid=other).geometry
    # a CSV cannot hold "": the name the error lists chooses it there
    pd.DataFrame(
        {"image_path": [str(folder)] * 2, "series_uid": ["<empty UID>", other], "coordX": 0.0, "coordY": 0.0, "coordZ": 0.0}
    ).to_csv(tmp_path / "m.csv", index=False)
    manifest = read_manifest(tmp_path / "m.csv")
    assert [manifest.series_uid(r) for r in range(2)] == ["", other]
    assert [len(rows) for _, _, rows in manifest.volumes()] == [1, 1]


def _same_geometry(a: Geometry, b: Geometry) -> None:
    assert a.size == b.size
    np.testing.assert_allclose(a.spacing, b.spacing, atol=1e-5)
    np.testing.assert_allclose(a.origin, b.origin, atol=1e-4)
    np.testing.assert_allclose(a.direction, b.direction, atol=1e-6)


BOXES = [((0, 0, 0), None), ((3, 5, 2), (10, 7, 1)), ((1, 2, -3), (5, 6, 3))]  # None: the whole; -3: from the end


def _check_boxes(folder, uid=None) -> None:
    whole = read_volume(folder, uid)
    stack = dicom_stack(folder, uid)
    assert stack is not None
    _same_geometry(stack.geometry, whole.geometry)  # the headers describe what ITK reads
    nx, ny, nz = whole.geometry.size
    for start, size in BOXES:
        size = size or (nx, ny, nz)
        start = (start[0], start[1], start[2] % nz)
        region = read_stack_region(stack, start, size)
        (x0, y0, z0), (sx, sy, sz) = start, size
        np.testing.assert_array_equal(region.array, whole.array[z0 : z0 + sz, y0 : y0 + sy, x0 : x0 + sx])
        assert region.array.dtype == whole.array.dtype
        _same_geometry(region.geometry, Geometry(size, whole.geometry.spacing,
                       tuple(whole.geometry.index_to_world(np.asarray(start, float))), whole.geometry.direction))  # fmt: skip


def test_an_oblique_shuffled_dicom_stack_is_read_by_the_box(tmp_path):
    from test_segment_dicomseg import write_series  # an oblique series, files shuffled, InstanceNumbers out of order

    write_series(tmp_path / "series")
    _check_boxes(tmp_path / "series")
    (in_slice_order,) = dicom_series(tmp_path / "series").values()
    gapped = tmp_path / "gapped"
    gapped.mkdir()
    for f in in_slice_order[:2] + in_slice_order[3:]:  # the third slice is missing
        (gapped / Path(f).name).write_bytes(Path(f).read_bytes())
    with pytest.raises(VolumeError, match="gap of 5.0 mm"):  # a missing slice: refused, by both readers
        dicom_stack(gapped)
    with pytest.raises(VolumeError, match="gap of 5.0 mm"):
        read_volume(gapped)


def test_the_real_ct_series_is_read_by_the_box(need_shared):
    _check_boxes(need_shared(*DICOM_CT))


# ------------------------------------------------------------------------------ series that are not one clean stack

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SERIES_UID = "1.2.826.0.1.3680043.8.498.777"


def write_stack(folder: Path, z: list[float], orientations: dict[int, tuple] | None = None) -> Path:
    """An axial CT series, one file per z (mm), InstanceNumber 1, 2, … in the order given; voxel value 10·z + x."""
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    for n, zk in enumerate(z):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.Modality = SERIES_UID, "1.2.3", "CT"
        ds.InstanceNumber = n + 1
        ds.ImagePositionPatient = [-10.0, -8.0, zk]
        ds.ImageOrientationPatient = list((orientations or {}).get(n, AXIAL))
        ds.PixelSpacing, ds.Rows, ds.Columns = [1.0, 1.0], 12, 14
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = (np.round(10 * zk) + np.arange(14)[None, :] + np.zeros((12, 1))).astype(np.int16).tobytes()
        ds.save_as(folder / f"f{n:03d}.dcm", enforce_file_format=True)
    return folder


EVEN = [2.5 * k for k in range(20)]
BROKEN = {
    "gap": (EVEN[:11] + EVEN[12:], "gap of 5.0 mm between instance 11 and 12, expected 2.5 mm (1 slice missing)"),
    "duplicate": (EVEN[:8] + [EVEN[7]] + EVEN[8:],
                  "instance 8 and 9 lie at the same position (-10.0, -8.0, 17.5) mm (a duplicated slice; "
                  "1 such pair); keep one of them"),
    "spacing": ([2.5 * k for k in range(10)] + [22.5 + 3.5 * k for k in range(1, 11)],
                "slice spacing changes from 2.5 mm to 3.5 mm between instance 10 and 11"),
    "orientation": (EVEN, "1 of 20 slices have another orientation (instance 6: (1.0, 0.0, 0.0, 0.0, 0.9962, "
                    "-0.0872), the others (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)); the series is not one stack"),
}  # fmt: skip
TILTED = {5: (1.0, 0.0, 0.0, 0.0, float(np.cos(0.0873)), float(-np.sin(0.0873)))}  # slice 6 tilted by 5°
HINT = "; to read it anyway, interpolating slices by their position, use --irregular-series resample"


@pytest.mark.parametrize("case", sorted(BROKEN))
@pytest.mark.parametrize("reader", ["header fast path", "whole series", "geometry"])
def test_a_series_that_is_not_one_clean_stack_is_refused_by_every_reader(tmp_path, case, reader):
    z, problem = BROKEN[case]
    folder = write_stack(tmp_path / case, z, TILTED if case == "orientation" else None)
    read = {"header fast path": dicom_stack, "whole series": read_volume, "geometry": read_geometry}[reader]
    with pytest.raises(VolumeError) as info:
        read(folder)
    expected = f"{folder}: series {SERIES_UID}: {problem}"
    if case in ("gap", "spacing"):
        expected += HINT + " (irregular_series='resample')"
    assert str(info.value) == expected
    if case in ("duplicate", "orientation"):  # no opting in: there is no right answer to read
        with pytest.raises(VolumeError, match="same position|another orientation"):
            read(folder, irregular="resample")


@pytest.mark.parametrize("case", ["gap", "spacing"])
def test_an_irregular_series_is_resampled_by_position_when_asked(tmp_path, case):
    """Slices are placed where their headers say: values linear in z (10·z) come out exactly 10·z on the even grid."""
    z, problem = BROKEN[case]
    folder = write_stack(tmp_path / case, z)
    stack = dicom_stack(folder, irregular="resample")
    whole = read_volume(folder, irregular="resample")
    g = whole.geometry
    assert stack.geometry == g
    assert whole.note == stack.irregularity == f"series {SERIES_UID}: {problem}"
    extent = z[-1] - z[0]
    assert g.size == (14, 12, round(extent / 2.5) + 1)
    assert g.spacing == (1.0, 1.0, extent / (g.size[2] - 1))
    assert g.origin == (-10.0, -8.0, 0.0)
    slice_z = np.arange(g.size[2]) * g.spacing[2]
    np.testing.assert_allclose(whole.array[:, 0, 0], 10 * slice_z, atol=1e-3)  # by position, not by file index
    np.testing.assert_allclose(whole.array[:, 3, 5], 10 * slice_z + 5, atol=1e-3)
    box = read_stack_region(stack, (2, 1, 7), (5, 4, 6))  # the fast path gives the same voxels
    np.testing.assert_array_equal(box.array, whole.array[7:13, 1:5, 2:7])
    assert box.geometry.origin == pytest.approx(g.index_to_world(np.array([2.0, 1.0, 7.0])))
    assert read_geometry(folder, irregular="resample") == g


def test_slice_positions_rounded_to_a_tenth_of_a_millimetre_still_form_one_stack(tmp_path):
    z = [round(0.625 * k, 1) for k in range(17)]  # 0.0, 0.6, 1.2, 1.9, 2.5, …: steps of 0.6 and 0.7 mm
    folder = write_stack(tmp_path / "rounded", z)
    stack = dicom_stack(folder)
    assert stack.offsets is None and stack.irregularity is None
    assert stack.geometry.spacing == (1.0, 1.0, 0.625) and stack.geometry.size == (14, 12, 17)
    assert read_volume(folder).geometry == stack.geometry
