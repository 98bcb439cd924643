"""Read 2D images (PNG, JPEG, TIFF, single-frame DICOM) into [0, 1] and shape them for a 2D profile.

DICOM pixel data goes through the modality LUT (rescale slope/intercept), then the VOI LUT (scaled by the LUT's
own output range, so one stored value maps to one output in every image) or the first window centre/width with its
VOI LUT Function (LINEAR, LINEAR_EXACT, SIGMOID, PS3.3 C.11.2.1.2-3), else the image's own range; MONOCHROME1 is
inverted. Other files are scaled by their
bit depth. Images that come out nearly black are flagged: a 12-bit image in a 16-bit container, or a
wrong window, is the commonest silent error with 2D medical images.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from medfm.data.profiles import Profile2D
from medfm.errors import VolumeError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass
class Image2D:
    """A 2D image scaled to [0, 1]: (H, W) for grey, (H, W, 3) for colour, and how it was scaled."""

    array: np.ndarray
    path: str
    scaling: str


def _is_dicom(path: str) -> bool:
    if path.lower().endswith(DICOM_SUFFIXES):
        return True
    with open(path, "rb") as fh:
        fh.seek(128)
        return fh.read(4) == b"DICM"


def _window(values: np.ndarray, centre: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """A DICOM VOI function (PS3.3 C.11.2.1.2 LINEAR and LINEAR_EXACT, C.11.2.1.3 SIGMOID), to [0, 1]."""
    function = function.strip().upper() or "LINEAR"
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - centre) / width + 0.5, 0.0, 1.0)
    if function != "LINEAR":
        raise ValueError(
            f"VOI LUT Function (0028,1056) is {function!r}; the standard defines LINEAR, LINEAR_EXACT, SIGMOID"
        )
    low = centre - 0.5 - (width - 1) / 2
    return np.clip((values - low) / max(width - 1, 1e-6), 0.0, 1.0)


def _voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """The first VOI LUT of the sequence, its output scaled by the LUT's own range (its smallest to largest entry)."""
    from pydicom.pixels import apply_voi_lut

    n, first = int(ds.VOILUTSequence[0].LUTDescriptor[0] or 65536), int(ds.VOILUTSequence[0].LUTDescriptor[1])
    table = apply_voi_lut(np.arange(first, first + n, dtype=np.int64), ds).astype(np.float64)
    low, high = float(table.min()), float(table.max())
    if np.array_equal(values, np.rint(values)):  # a LUT is indexed by whole stored values
        values = values.astype(np.int64)
    return (apply_voi_lut(values, ds).astype(np.float64) - low) / max(high - low, 1e-12)


def _decode_reason(err: Exception) -> str:
    """A decoder's message on one line, whole: pydicom names the plugin and the package to install after the first."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return " ".join(lines)[:600] if lines else type(err).__name__


def _first(value: object) -> float:
    """The first of a multi-valued DICOM number (window centres and widths may hold several)."""
    try:
        return float(value[0])  # type: ignore[index]
    except TypeError:
        return float(value)  # type: ignore[arg-type]


def _read_dicom(path: str) -> Image2D:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(path, force=True)
        if "PixelData" not in ds:
            raise VolumeError(path, "DICOM file has no pixel data")
        frames = _frames(ds, path)
        if frames > 1:
            raise VolumeError(path, f"multi-frame DICOM ({frames} frames); give single-frame images")
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            ds.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
            ds.file_meta.TransferSyntaxUID = (
                pydicom.uid.ImplicitVRLittleEndian if ds.is_implicit_VR else pydicom.uid.ExplicitVRLittleEndian
            )
        pixels = ds.pixel_array
    except VolumeError:
        raise
    except Exception as err:  # pydicom raises many kinds (missing decoder plugins among them)
        raise VolumeError(path, f"DICOM pixel data cannot be decoded ({_decode_reason(err)})") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if pixels.ndim == 3 and pixels.shape[-1] == 3:
            return Image2D(
                pixels.astype(np.float32) / float(2 ** int(ds.get("BitsStored", 8)) - 1), path, "rgb bit depth"
            )
        raise VolumeError(path, f"unsupported photometric interpretation {photometric}")
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if "VOILUTSequence" in ds:
        scaled, how = _voi_lut(values, ds), "VOI LUT"
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        centre, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "") or "LINEAR").upper()
        try:
            scaled = _window(values, centre, width, function)
        except ValueError as err:
            raise VolumeError(path, str(err)) from None
        how = f"window {centre:g}/{width:g}" + ("" if function == "LINEAR" else f" {function}")
    else:
        low, high = float(values.min()), float(values.max())
        scaled, how = (values - low) / max(high - low, 1e-12), "min–max"
    if photometric == "MONOCHROME1":
        scaled, how = 1.0 - scaled, how + ", MONOCHROME1 inverted"
    return Image2D(scaled.astype(np.float32), path, how)


def _frames(ds: Dataset, path: str) -> int:
    """The Number of Frames (0028,0008) of a DICOM image, 1 when absent; a value that is not a count names the tag."""
    try:
        with warnings.catch_warnings():  # pydicom warns of an invalid IS before failing; the error below says it
            warnings.simplefilter("ignore")
            value = ds.get("NumberOfFrames", 1)
        frames = int(str(value).strip() or 1)
    except (ValueError, TypeError):  # pydicom cannot even convert it: show the bytes as stored
        raw = ds.get_item(0x00280008).value
        value, frames = raw.decode("ascii", "replace").strip() if isinstance(raw, bytes) else raw, 0
    if frames < 1:
        raise VolumeError(path, f"Number of Frames (0028,0008) is {str(value)!r}, not a count of frames (1 or more)")
    return frames


def _read_bitmap(path: str) -> Image2D:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            array = np.asarray(image)
    except (UnidentifiedImageError, OSError) as err:
        raise VolumeError(path, f"cannot be read as an image ({err})") from None
    if mode in ("RGBA", "LA", "P", "PA", "CMYK", "YCbCr"):
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
        return Image2D(rgb.astype(np.float32) / 255.0, path, f"{mode}→RGB /255")
    if mode == "1":
        return Image2D(array.astype(np.float32), path, "binary")
    if mode == "F":
        low, high = float(array.min()), float(array.max())
        return Image2D(((array - low) / max(high - low, 1e-12)).astype(np.float32), path, "float min–max")
    if array.dtype == np.uint8:
        return Image2D(array.astype(np.float32) / 255.0, path, "8-bit /255")
    if array.dtype in (np.uint16, np.int32, np.uint32, np.int16) or mode.startswith("I"):
        return Image2D(array.astype(np.float32) / 65535.0, path, "16-bit /65535")
    raise VolumeError(path, f"unsupported image mode {mode}")


def read_image2d(path: str | os.PathLike[str]) -> Image2D:
    """Read a PNG/JPEG/TIFF/BMP or single-frame DICOM image, scaled to [0, 1]."""
    path = str(path)
    if not os.path.isfile(path):
        raise VolumeError(path, "file not found")
    image = _read_dicom(path) if _is_dicom(path) else _read_bitmap(path)
    if image.array.ndim not in (2, 3) or min(image.array.shape[:2]) < 2:
        raise VolumeError(path, f"expected a 2D image, got an array of shape {image.array.shape}")
    return image


def intensity_warning2d(image: Image2D) -> str | None:
    """A warning when a scaled image is nearly black or flat (wrong bit depth or window)."""
    a = image.array
    high = float(np.percentile(a, 99))
    if float(a.max() - a.min()) < 1e-6:
        return f"{image.path}: the image is constant ({image.scaling}); check the file"
    if high < 0.1:
        return (
            f"{image.path}: 99% of pixels are below {high:.3f} after {image.scaling} scaling — a 12-bit image in a "
            "16-bit container, or a wrong window? The model expects the full [0, 1] range"
        )
    return None


def preprocess2d(image: Image2D, profile: Profile2D) -> np.ndarray:
    """Resize to the profile's size, set the channels, normalise; returns (C, H, W) float32."""
    import torch  # here, not at import: a 3D `medfm crop` never needs torch
    import torch.nn.functional as F  # noqa: N812 - torch's own name for it

    a = image.array
    x = torch.from_numpy(np.ascontiguousarray(a if a.ndim == 3 else a[..., None])).permute(2, 0, 1)[None].float()
    if x.shape[1] == 3 and profile.channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    h, w = x.shape[-2:]
    th, tw = profile.size
    if profile.resize == "resize":
        x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
    elif profile.resize == "shorter-crop":
        scale = max(th / h, tw / w)
        x = F.interpolate(
            x,
            size=(max(th, round(h * scale)), max(tw, round(w * scale))),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        top, left = (x.shape[-2] - th) // 2, (x.shape[-1] - tw) // 2
        x = x[..., top : top + th, left : left + tw]
    else:  # letterbox
        scale = min(th / h, tw / w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        top, left = (th - nh) // 2, (tw - nw) // 2
        x = F.pad(x, (left, tw - nw - left, top, th - nh - top), value=0.0)
    x = x.clamp(0.0, 1.0)
    if x.shape[1] == 1 and profile.channels == 3:
        x = x.repeat(1, 3, 1, 1)
    mean = torch.tensor(profile.mean).view(1, -1, 1, 1)
    std = torch.tensor(profile.std).view(1, -1, 1, 1)
    return ((x - mean) / std)[0].numpy().astype(np.float32)
