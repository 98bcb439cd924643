"""DICOM-SEG of predicted masks: a synthetic oblique CT series written in shuffled order with scrambled instance
numbers, a mask with known asymmetric blocks, and the segmentation read back frame by frame (segment, source
instance, plane position, pixels) — directly, from a mask stored in another axis order, and end to end through
``medfm segment predict``; the real TotalSegmentator DICOM series with its own organ segmentation when present."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from safetensors.torch import save_file

import medfm
from medfm.data import profiles
from medfm.data.io import Geometry, read_image
from medfm.errors import RowError, VolumeError
from medfm.models import hub
from medfm.segment import predict as predict_module
from medfm.segment.cases import align_mask
from medfm.segment.dicomseg import mask_on_slices, series_datasets, write_dicom_seg
from medfm.segment.launch import main
from medfm.segment.model import build_unet

ROWS, COLS, SLICES = 16, 20, 6
ROW_SPACING, COL_SPACING, SLICE_GAP = 0.7, 0.9, 2.5  # PixelSpacing = [row, column]; rows ≠ columns on purpose
NAMES = ["lesion", "cyst"]


def _cosines() -> tuple[np.ndarray, np.ndarray]:
    """An oblique orientation: the row direction turned 30° in the axial plane, the column direction tilted 20°."""
    a, b = np.deg2rad(30), np.deg2rad(20)
    row = np.array([np.cos(a), np.sin(a), 0.0])
    col = np.array([-np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), np.sin(b)])
    return row, col


def truth_labels() -> np.ndarray:
    """Class indices per generated slice (ascending along the slice normal), row and column: asymmetric blocks."""
    truth = np.zeros((SLICES, ROWS, COLS), np.uint8)
    truth[1:4, 2:7, 3:12] = 1  # 3 slices × 5 rows × 9 columns
    truth[4, 10:14, 1:5] = 2  # one slice × 4 rows × 4 columns, near the first columns
    return truth


def write_series(folder: Path, seed: int = 0, slices: int = SLICES, study: str | None = None, **drop: bool) -> dict:
    """A CT series of ``slices`` files in shuffled order with non-sequential InstanceNumbers; HU 500 inside class 1,
    -900 inside class 2, 0 elsewhere. Returns its UIDs and each generated slice's SOPInstanceUID and position."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    row, col = _cosines()
    normal = np.cross(row, col)
    origin = np.array([-31.25, 17.5, -120.0])
    study = study or generate_uid()
    series, frame_of_reference = generate_uid(), generate_uid()
    hu = np.where(truth_labels() == 1, 500, np.where(truth_labels() == 2, -900, 0)).astype(np.int16)
    uids, positions = [], []
    order = rng.permutation(slices)
    for n, k in enumerate(order):
        position = origin + k * SLICE_GAP * normal
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "P001", "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20240101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 3, int(100 - 7 * n)  # not in slice order
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
        ds.PixelSpacing = [ROW_SPACING, COL_SPACING]
        ds.SliceThickness = SLICE_GAP
        ds.Rows, ds.Columns = ROWS, COLS
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = hu[min(k, SLICES - 1)].tobytes()
        for key in drop:
            delattr(ds, key)
        ds.save_as(folder / f"im{rng.integers(1 << 30):010d}.dcm", enforce_file_format=True)
        uids.append((int(k), meta.MediaStorageSOPInstanceUID))
        positions.append((int(k), position))
    return {
        "study": study,
        "series": series,
        "frame_of_reference": frame_of_reference,
        "by_slice": [uid for _, uid in sorted(uids)],
        "positions": [p for _, p in sorted(positions, key=lambda kp: kp[0])],
    }


def mask_in_image_geometry(image: sitk.Image) -> np.ndarray:
    """``truth_labels`` sampled on ``image``'s voxel grid through world coordinates (no axis convention assumed)."""
    geometry = Geometry.of_image(image)
    row, col = _cosines()
    normal = np.cross(row, col)
    origin = np.array([-31.25, 17.5, -120.0])
    xs, ys, zs = np.meshgrid(*(np.arange(n) for n in geometry.size), indexing="ij")
    world = geometry.index_to_world(np.stack([xs, ys, zs], axis=-1).reshape(-1, 3)) - origin
    c, r, k = world @ row / COL_SPACING, world @ col / ROW_SPACING, world @ normal / SLICE_GAP
    kri = np.rint(np.stack([k, r, c], axis=1)).astype(int)
    assert np.abs(np.stack([k, r, c], axis=1) - kri).max() < 1e-3  # the image's voxels are the series' pixels
    labels = truth_labels()[kri[:, 0], kri[:, 1], kri[:, 2]]
    return labels.reshape(geometry.size).transpose(2, 1, 0)  # (x, y, z) → the (Z, Y, X) array order


def frames_of(path: Path) -> list[dict]:
    """Every frame of a SEG file, read with pydicom: segment number, source instance, position and pixels."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    out = []
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        out.append(
            {
                "segment": int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber),
                "uid": source.ReferencedSOPInstanceUID,
                "position": np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]),
                "pixels": pixels[i],
            }
        )
    return out


def check_frames(path: Path, series: dict, truth: np.ndarray, names: list[str] = NAMES) -> None:
    """The SEG holds exactly one frame per (segment, slice) where the segment is present, each on its slice."""
    expected = {(s, k) for s in range(1, len(names) + 1) for k in range(truth.shape[0]) if np.any(truth[k] == s)}
    frames = frames_of(path)
    assert len(frames) == len(expected)
    seen = set()
    for frame in frames:
        k = series["by_slice"].index(frame["uid"])  # the source instance the frame references
        assert np.allclose(frame["position"], series["positions"][k], atol=1e-4)
        assert np.array_equal(frame["pixels"], (truth[k] == frame["segment"]).astype(np.uint8))
        seen.add((frame["segment"], k))
    assert seen == expected


@pytest.fixture
def ct_series(tmp_path) -> tuple[Path, dict]:
    folder = tmp_path / "series"
    return folder, write_series(folder)


# --- the module ------------------------------------------------------------------------------------------------


def test_segmentation_frames_map_onto_the_right_slices_rows_and_columns(ct_series, tmp_path):
    folder, series = ct_series
    image = read_image(folder)
    assert sitk.GetArrayViewFromImage(image).shape == (SLICES, ROWS, COLS)
    mask = mask_in_image_geometry(image)
    assert np.bincount(mask.ravel(), minlength=3).tolist()[1:] == [135, 16]

    datasets = series_datasets(folder)
    assert [ds.SOPInstanceUID for ds in datasets] == series["by_slice"]  # sorted along the normal, not by file
    frames = mask_on_slices(mask, Geometry.of_image(image), datasets)
    assert np.array_equal(frames, truth_labels())

    dest = write_dicom_seg(mask, Geometry.of_image(image), folder, None, NAMES, tmp_path / "a.seg.dcm", "U-Net test",
                           serial="abc123", parameters={"encoder": "resnet3d"})  # fmt: skip
    check_frames(dest, series, truth_labels())

    seg = hd.seg.segread(dest)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == series["study"] and seg.FrameOfReferenceUID == series["frame_of_reference"]
    assert seg.SeriesInstanceUID != series["series"]
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == NAMES
    for s in seg.SegmentSequence:
        assert s.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = s.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "medfm U-Net test" and algorithm.AlgorithmVersion == medfm.__version__
        assert algorithm.AlgorithmSource == "medfm" and algorithm.AlgorithmParameters == "encoder=resnet3d"
    assert seg.Manufacturer == "medfm" and seg.SoftwareVersions == medfm.__version__
    assert seg.DeviceSerialNumber == "abc123"
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(series["by_slice"])
    # highdicom's own reader agrees, per source instance, with the labels combined
    pixels = seg.get_pixels_by_source_instance(series["by_slice"], combine_segments=True)
    assert np.array_equal(pixels, truth_labels())


def test_a_mask_stored_in_another_axis_order_gives_the_same_frames(ct_series, tmp_path):
    folder, series = ct_series
    image = read_image(folder)
    mask = sitk.GetImageFromArray(mask_in_image_geometry(image))
    mask.CopyInformation(image)
    # what the model grid uses (here the stored order), all axes reversed (same shape), two permuted and flipped orders
    for code in ("LPS", "RAI", "SAR", "IRA"):
        turned = sitk.DICOMOrient(mask, code)
        assert (turned.GetDirection() == mask.GetDirection()) == (code == "LPS")
        array = sitk.GetArrayFromImage(turned)
        dest = write_dicom_seg(array, Geometry.of_image(turned), folder, None, NAMES, tmp_path / f"{code}.dcm", "m")
        check_frames(dest, series, truth_labels())


def test_a_mask_off_the_series_grid_or_without_uids_is_a_clear_error(ct_series, tmp_path):
    folder, _ = ct_series
    image = read_image(folder)
    mask = mask_in_image_geometry(image)
    geometry = Geometry.of_image(image)
    shifted = Geometry(geometry.size, geometry.spacing, tuple(np.add(geometry.origin, (0.3, 0.0, 0.0))),
                       geometry.direction)  # fmt: skip
    with pytest.raises(VolumeError, match=r"DICOM-SEG cannot be made: instance .* lies 0\.\d\d voxels off"):
        write_dicom_seg(mask, shifted, folder, None, NAMES, tmp_path / "x.dcm", "m")
    with pytest.raises(VolumeError, match="mask holds class 2 but the model has 1 classes"):
        write_dicom_seg(mask, geometry, folder, None, NAMES[:1], tmp_path / "x.dcm", "m")
    bare = tmp_path / "bare"
    write_series(bare, seed=1, StudyInstanceUID=True)
    with pytest.raises(VolumeError, match=r"bare: DICOM-SEG cannot be made: the series' instances lack "
                       r"StudyInstanceUID \(absent or empty"):  # fmt: skip
        write_dicom_seg(mask, geometry, bare, None, NAMES, tmp_path / "x.dcm", "m")
    assert not (tmp_path / "x.dcm").exists()


# --- through `medfm segment predict` ---------------------------------------------------------------------------


@pytest.fixture
def tiny_card(tmp_path) -> Path:
    """A 3D segmenter card with random weights (the logits are replaced in the test: geometry is what is checked)."""
    folder = tmp_path / "model"
    folder.mkdir()
    net = build_unet("resnet3d", {"depth": 10, "widen_factor": 0.25}, 1, len(NAMES) + 1, [8, 8, 8, 8, 8])
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    profile = profiles.get_profile("fmcib")
    card = {
        "kind": "medfm-segmenter", "dims": 3, "classes": NAMES, "class_map": {"1": "lesion", "2": "cyst"},
        "encoder": {"name": "resnet3d", "args": {"depth": 10, "widen_factor": 0.25}, "in_channels": 1},
        "decoder_channels": [8, 8, 8, 8, 8], "profile": profile.name, "profile_spec": profile.to_dict(),
        "spacing": None, "hu_window": [-1000, 1000], "patch_size": None, "overlap": 0.5, "sw_batch_size": 1,
        "weights": "model.safetensors", "sha256": hub.sha256_of(folder / "model.safetensors"),
    }  # fmt: skip
    (folder / "model.json").write_text(json.dumps(card))
    return folder / "model.json"


def _threshold_logits(net, x, roi, overlap, sw_batch, device) -> torch.Tensor:
    """A stand-in for the network: class 1 above 0.7 of the window, class 2 below 0.1 (HU 500 and -900)."""
    v = torch.from_numpy(x[0])
    return torch.stack([torch.zeros_like(v), (v > 0.7).float() * 10, (v < 0.1).float() * 10])


def test_predict_writes_a_dicom_seg_beside_the_nifti_for_the_chosen_series(tiny_card, tmp_path, monkeypatch):
    monkeypatch.setattr(predict_module, "_logits", _threshold_logits)
    folder = tmp_path / "study"
    series = write_series(folder)
    write_series(folder, seed=5, slices=3, study=series["study"])  # a second series in the same folder
    nifti = tmp_path / "ct.nii.gz"
    sitk.WriteImage(read_image(folder, series["series"]), str(nifti))
    rows = {"image_path": [folder.name, nifti.name], "series_uid": [series["series"], None], "id": ["a", "b"]}
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "pred"
    assert main(["predict", str(tiny_card), str(tmp_path / "m.csv"), "--out", str(out), "--quiet"]) == 0
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert table["seg_path"].tolist() == ["0000_study.seg.dcm", ""]  # auto: only the DICOM series gets one
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / table["mask_file"][0])))
    assert np.bincount(mask.ravel(), minlength=3).tolist()[1:] == [135, 16]
    check_frames(out / table["seg_path"][0], series, truth_labels())
    seg = hd.seg.segread(out / table["seg_path"][0])
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "medfm U-Net on resnet3d" and algorithm.AlgorithmVersion == medfm.__version__
    assert seg.DeviceSerialNumber == json.loads(tiny_card.read_text())["sha256"][:16]

    never = tmp_path / "never"
    assert main(["predict", str(tiny_card), str(tmp_path / "m.csv"), "--out", str(never), "--quiet",
                 "--dicom-seg", "never"]) == 0  # fmt: skip
    assert pd.read_csv(never / "predictions.csv", keep_default_na=False)["seg_path"].tolist() == ["", ""]
    assert not list(never.glob("*.seg.dcm"))

    # always: the NIfTI row is an error naming the row and the file, before anything is segmented
    with pytest.raises(RowError, match=r"row 1 \(image_path=.*ct\.nii\.gz\): --dicom-seg always: the image is not "
                       "a DICOM series folder"):  # fmt: skip
        predict_module.predict_manifest(tiny_card, tmp_path / "m.csv", tmp_path / "always", dicom_seg="always",
                                        progress=False)  # fmt: skip
    assert not list((tmp_path / "always").glob("*.nii.gz"))


def test_a_dicom_seg_that_cannot_be_made_keeps_the_nifti_with_skip(tiny_card, tmp_path, monkeypatch):
    monkeypatch.setattr(predict_module, "_logits", _threshold_logits)
    good, bare = tmp_path / "good", tmp_path / "bare"
    series = write_series(good)
    write_series(bare, seed=2, SOPInstanceUID=True)  # readable as a volume, but nothing a SEG could reference
    pd.DataFrame({"image_path": [good.name, bare.name]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(RowError, match=r"row 1 \(image_path=.*bare\): DICOM-SEG cannot be made: the series' "
                       r"instances lack SOPInstanceUID .*\(the NIfTI mask 0001_bare_mask\.nii\.gz was written\)"):  # fmt: skip
        predict_module.predict_manifest(tiny_card, tmp_path / "m.csv", tmp_path / "raise", progress=False,
                                        dicom_seg="always")  # fmt: skip
    out = tmp_path / "skip"
    assert main(["predict", str(tiny_card), str(tmp_path / "m.csv"), "--out", str(out), "--quiet",
                 "--on-error", "skip", "--dicom-seg", "always"]) == 0  # fmt: skip
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert table["mask_file"].tolist() == ["0000_good_mask.nii.gz", "0001_bare_mask.nii.gz"]
    assert table["seg_path"].tolist() == ["0000_good.seg.dcm", ""]
    assert (out / "0001_bare_mask.nii.gz").is_file() and not (out / "0001_bare.seg.dcm").exists()
    errors = pd.read_csv(out / "predictions.errors.csv")
    assert errors["row"].tolist() == [1] and "lack SOPInstanceUID" in errors["reason"][0]
    check_frames(out / "0000_good.seg.dcm", series, truth_labels())


# --- real data -------------------------------------------------------------------------------------------------


def test_real_ct_series_with_its_own_organ_segmentation(need_shared, tmp_path):
    source = need_shared("totalsegmentator_example", "example_ct_dicom")
    seg_nifti = need_shared("totalsegmentator_example", "example_seg_dicom.nii.gz")
    # the example's instances carry empty Study/Series/SOP Instance UIDs: a SEG cannot reference them as they are
    with pytest.raises(VolumeError, match="lack StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, SOPClassUID"):
        series_datasets(source)
    folder = tmp_path / "ct"
    folder.mkdir()
    study, series_uid = generate_uid(), generate_uid()
    for path in sorted(source.iterdir()):  # give them the UIDs a conformant de-identification keeps
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        meta = ds.file_meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.save_as(folder / path.name)
    image = read_image(folder)
    organs = sitk.ReadImage(str(seg_nifti))  # stored with y reversed: the SEG must follow geometry, not axes
    assert organs.GetDirection() != image.GetDirection()
    values = sitk.GetArrayFromImage(organs)
    mask = np.select([values == 1, values == 5, values == 6], [1, 2, 3], 0).astype(np.uint8)  # spleen, liver, stomach
    names = ["spleen", "liver", "stomach"]
    dest = write_dicom_seg(mask, Geometry.of_image(organs), folder, None, names, tmp_path / "real.seg.dcm", "m")

    turned = sitk.GetImageFromArray(mask)
    turned.CopyInformation(organs)
    on_image = sitk.GetArrayFromImage(align_mask(image, turned)[0])  # (Z, Y, X) on the series' own grid
    datasets = series_datasets(folder)
    expected = {"by_slice": [ds.SOPInstanceUID for ds in datasets],
                "positions": [np.array([float(v) for v in ds.ImagePositionPatient]) for ds in datasets]}  # fmt: skip
    z = [float(p[2]) for p in expected["positions"]]
    # axial, feet to head, on an identity direction from the lowest slice: the array's slice order
    assert z == sorted(z) and np.allclose(np.diff(z), image.GetSpacing()[2]) and image.GetOrigin()[2] == z[0]
    assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    check_frames(dest, expected, on_image, names)
    seg = hd.seg.segread(dest)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == names
    assert int(seg.NumberOfFrames) == sum(int(np.any(on_image[k] == s)) for s in (1, 2, 3) for k in range(len(z)))
    shutil.rmtree(folder)


def test_auto_falls_back_to_the_nifti_mask_with_a_warning_and_resume_follows_the_options(
    tiny_card, tmp_path, monkeypatch
):
    monkeypatch.setattr(predict_module, "_logits", _threshold_logits)
    good, bare = tmp_path / "good", tmp_path / "bare"
    write_series(good)
    write_series(bare, seed=2, SOPInstanceUID=True)  # readable, but a SEG could not reference its instances
    pd.DataFrame({"image_path": [good.name, bare.name]}).to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "auto"
    with pytest.warns(UserWarning, match=r"row 1 \(image_path=.*bare\): DICOM-SEG cannot be made: .*lack SOPInstanceUID"):
        predict_module.predict_manifest(tiny_card, tmp_path / "m.csv", out, progress=False)
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert table["seg_path"].tolist() == ["0000_good.seg.dcm", ""]
    assert table["warnings"][0] == "" and "lack SOPInstanceUID" in table["warnings"][1]
    assert (out / "0001_bare_mask.nii.gz").is_file() and not (out / "predictions.errors.csv").exists()

    # interrupted after the first row with --dicom-seg never, then resumed with other options
    original, calls = predict_module._predict3d, []

    def interrupted(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(args[1])
        return original(*args, **kwargs)

    def resumed(dest, **options):
        monkeypatch.setattr(predict_module, "_predict3d", interrupted)
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            predict_module.predict_manifest(tiny_card, tmp_path / "m.csv", dest, progress=False, dicom_seg="never")
        calls.clear()
        monkeypatch.setattr(predict_module, "_predict3d", lambda *a, **k: calls.append(a[1]) or original(*a, **k))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            predict_module.predict_manifest(tiny_card, tmp_path / "m.csv", dest, progress=False, resume=True, **options)
        assert not (dest / "predictions.partial").exists()
        return [Path(c).name for c in calls], pd.read_csv(dest / "predictions.csv", keep_default_na=False)

    redone, table = resumed(tmp_path / "never", dicom_seg="never")
    assert redone == ["bare"] and table["seg_path"].tolist() == ["", ""]  # the kept row has what "never" asks
    redone, table = resumed(tmp_path / "auto-now", dicom_seg="auto")
    assert redone == ["good", "bare"]  # the kept row has no SEG and "auto" wants one: it is segmented again
    assert table["seg_path"].tolist() == ["0000_good.seg.dcm", ""]
    redone, table = resumed(tmp_path / "overlays", dicom_seg="never", overlays=True)
    assert redone == ["good", "bare"] and table["overlay_file"].tolist() == ["0000_good_overlay.png", "0001_bare_overlay.png"]
