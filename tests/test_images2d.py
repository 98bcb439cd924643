"""2D images: PNG/JPEG/DICOM reading and scaling, profiles, and extraction from a 2D manifest."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medfm.data.images2d import Image2D, intensity_warning2d, preprocess2d, read_image2d
from medfm.data.manifest import read_manifest
from medfm.data.profiles import IMAGENET_MEAN, IMAGENET_STD, Profile2D, get_profile
from medfm.errors import VolumeError
from medfm.features.extract import extract_features


def _dicom(path, pixels, photometric="MONOCHROME2", slope=1.0, intercept=0.0, window=None, frames=1):
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_png_bit_depths_and_colour(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey).save(tmp_path / "g.png")
    np.testing.assert_allclose(read_image2d(tmp_path / "g.png").array, grey / 255.0, rtol=0, atol=1e-7)
    deep = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    np.testing.assert_allclose(read_image2d(tmp_path / "d.png").array, deep / 65535.0, rtol=0, atol=1e-7)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128
    Image.fromarray(rgba).save(tmp_path / "c.png")
    colour = read_image2d(tmp_path / "c.png").array
    assert colour.shape == (8, 8, 3) and colour[..., 0].min() == 1.0 and colour[..., 1].max() == 0.0


def test_dicom_rescale_window_and_monochrome1(tmp_path):
    pixels = np.array([[0, 1000], [2000, 4000]])
    # HU = 2·p − 1024 → [-1024, 976, 2976, 6976]; window 976/2000 → linear over [-24, 1976)
    image = read_image2d(_dicom(tmp_path / "a.dcm", pixels, slope=2, intercept=-1024, window=(976, 2000)))
    low = 976 - 0.5 - 1999 / 2
    expected = np.clip((np.array([[-1024, 976], [2976, 6976]]) - low) / 1999, 0, 1)
    np.testing.assert_allclose(image.array, expected, atol=1e-6)
    assert image.scaling.startswith("window 976/2000")
    inverted = read_image2d(_dicom(tmp_path / "b.dcm", pixels, photometric="MONOCHROME1"))
    np.testing.assert_allclose(inverted.array, 1 - pixels / 4000, atol=1e-6)  # min–max, then inverted
    with pytest.raises(VolumeError, match="multi-frame"):
        read_image2d(_dicom(tmp_path / "c.dcm", np.zeros((2, 4, 4)), frames=2))


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(VolumeError, match="file not found"):
        read_image2d(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(VolumeError, match="cannot be read"):
        read_image2d(tmp_path / "bad.png")


def test_dark_sixteen_bit_image_is_flagged(tmp_path):
    twelve_bit = (np.random.default_rng(0).integers(0, 4096, (16, 16))).astype(np.uint16)
    Image.fromarray(twelve_bit).save(tmp_path / "x.png")
    assert "12-bit" in intensity_warning2d(read_image2d(tmp_path / "x.png"))


@pytest.mark.parametrize("resize", ["resize", "shorter-crop", "letterbox"])
def test_preprocess_shapes_channels_and_normalisation(resize):
    profile = Profile2D(name="t", version="1", size=(32, 48), resize=resize)
    image = Image2D(np.full((20, 60), 0.5, np.float32), "mem", "test")
    x = preprocess2d(image, profile)
    assert x.shape == (3, 32, 48) and x.dtype == np.float32
    centre = x[:, 16, 24]
    np.testing.assert_allclose(centre, (0.5 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD), atol=1e-5)
    if resize == "letterbox":  # 20×60 → 16×48 inside 32×48: 8 rows of padding (value 0) above
        np.testing.assert_allclose(x[:, 0, 0], -np.array(IMAGENET_MEAN) / np.array(IMAGENET_STD), atol=1e-5)
    grey = preprocess2d(image, get_profile("gray-224"))
    assert grey.shape == (1, 224, 224) and np.allclose(grey, 0.5, atol=1e-5)


def test_real_dicom_and_xray_files(need_shared):
    ct = read_image2d(need_shared("dicom_io_samples", "CT_small.dcm"))
    assert ct.array.shape == (128, 128) and 0 <= ct.array.min() and ct.array.max() <= 1
    no_meta = read_image2d(need_shared("dicom_io_samples", "lungmask_testdata_0.dcm"))  # no file meta header
    assert no_meta.array.shape == (512, 512)
    ds = pydicom.dcmread(need_shared("dicom_io_samples", "MR_small.dcm"))
    mr = read_image2d(need_shared("dicom_io_samples", "MR_small.dcm"))
    assert mr.scaling == f"window {float(ds.WindowCenter):g}/{float(ds.WindowWidth):g}"
    xray = read_image2d(next(need_shared("chest_xray_nih").glob("*.png")))
    assert xray.array.shape == (512, 512) and xray.scaling == "8-bit /255"


def test_extract_2d_features_from_real_images(need_shared, tmp_path):
    """A 2D manifest of real X-rays and MRI slices → features of a torchvision ResNet18 with test-made weights."""
    import torchvision

    files = (
        sorted(need_shared("chest_xray_nih").glob("*.png"))
        + sorted(need_shared("brain_tumor_mri", "0").glob("*.jpg"))[:2]
    )
    pneumonia = np.load(need_shared("pneumoniamnist", "pneumoniamnist_reconstructed.npz"))
    for i in range(2):  # 28×28 chest X-rays, upsampled by the profile like any small image
        Image.fromarray(pneumonia["test_images"][i]).save(tmp_path / f"pneumonia_{i}.png")
        files.append(tmp_path / f"pneumonia_{i}.png")
    labels = [0, 0, 1, 1, 2, 2]
    pd.DataFrame({"image_path": [str(f) for f in files], "label": labels}).to_csv(tmp_path / "m.csv", index=False)
    torch.manual_seed(11)
    source = torchvision.models.resnet18(weights=None)
    source.fc = torch.nn.Identity()
    torch.save(source.state_dict(), tmp_path / "w.pt")
    manifest = read_manifest(tmp_path / "m.csv", seeds=False)
    result = extract_features(
        manifest,
        tmp_path / "f.parquet",
        model="resnet18",
        weights=tmp_path / "w.pt",
        num_workers=0,
        progress=False,
        batch_size=3,
    )
    table = pd.read_parquet(result.features)
    feats = table[[f"feat_{i}" for i in range(512)]].to_numpy()
    source.eval()
    profile = get_profile("imagenet-224")
    with torch.inference_mode():
        expected = source(torch.from_numpy(np.stack([preprocess2d(read_image2d(f), profile) for f in files]))).numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-4)
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["profile"]["name"] == "imagenet-224"
    assert sidecar["weights_sha256"] == hashlib.sha256((tmp_path / "w.pt").read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------- damaged inputs


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_function_is_applied_as_the_standard_defines(tmp_path, function):
    """Checked against pydicom's apply_voi_lut, whose output spans the stored range (here shifted by the rescale)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    pixels = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    path = _dicom(tmp_path / "a.dcm", pixels, slope=2, intercept=-1024, window=(1000, 801))
    ds = pydicom.dcmread(path)
    ds.VOILUTFunction = function
    ds.save_as(path)
    image = read_image2d(path)
    low, high = apply_voi_lut(np.array([-2e4, 2e4]), ds)  # pydicom's output range: its y_min, y_max
    assert (low, high) == (-1024.0, 2 * 4095 - 1024.0)
    expected = (apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds) - low) / (high - low)
    np.testing.assert_allclose(image.array, expected, rtol=0, atol=1e-6)
    assert image.scaling == "window 1000/801" + ("" if function == "LINEAR" else f" {function}")
    assert 0.1 < image.array[15, 40] < 0.9  # stored 1000 → 976 HU, inside the window


def test_a_voi_lut_sequence_maps_one_stored_value_to_one_output_in_every_image(tmp_path):
    """The LUT's output is scaled by the LUT's own range, not stretched per image."""
    lut = (100 + 60000 * (np.arange(4096) / 4095.0) ** 0.5).astype(np.uint16)
    outputs = []
    for name, high in (("narrow.dcm", 200), ("wide.dcm", 4000)):
        pixels = np.linspace(0, high, 64 * 64).astype(np.uint16).reshape(64, 64)
        pixels[0, 0] = 150
        path = _dicom(tmp_path / name, pixels)
        ds = pydicom.dcmread(path)
        item = Dataset()
        item.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor: entries, first stored value, bits
        item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
        ds.VOILUTSequence = [item]
        ds.save_as(path)
        image = read_image2d(path)
        assert image.scaling == "VOI LUT"
        outputs.append(image.array[0, 0])
    expected = (float(lut[150]) - lut.min()) / (float(lut.max()) - lut.min())
    np.testing.assert_allclose(outputs, [expected, expected], rtol=0, atol=1e-6)


def test_undecodable_dicom_keeps_the_decoders_advice_and_a_bad_frame_count_names_the_tag(tmp_path):
    from pydicom.dataelem import RawDataElement
    from pydicom.encaps import encapsulate
    from pydicom.tag import Tag

    path = _dicom(tmp_path / "htj2k.dcm", np.zeros((8, 8)))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"  # HTJ2K: needs pylibjpeg-openjpeg
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(40)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    try:
        _ = pydicom.dcmread(path).pixel_array
    except Exception as err:  # noqa: BLE001 - pydicom's own words, whatever its plugins say
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    else:
        pytest.skip("a HTJ2K decoder is installed")
    assert len(lines) > 1  # the advice is on the lines after the first
    with pytest.raises(VolumeError) as info:
        read_image2d(path)
    assert str(info.value) == f"{path}: DICOM pixel data cannot be decoded ({' '.join(lines)})"

    for value in (b"abc ", b"0 "):
        path = _dicom(tmp_path / "frames.dcm", np.zeros((8, 8)))
        ds = pydicom.dcmread(path)
        ds[0x00280008] = RawDataElement(Tag(0x00280008), "IS", len(value), value, 0, False, True)
        ds.save_as(path)
        with pytest.raises(VolumeError) as info:
            read_image2d(path)
        shown = value.decode().strip()
        assert str(info.value) == f"{path}: Number of Frames (0028,0008) is {shown!r}, not a count of frames (1 or more)"
