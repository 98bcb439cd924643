"""Read volumes (NIfTI, NRRD, MHA/MHD, DICOM series folders) with their exact geometry.

Geometry follows ITK: ``world_LPS = origin + direction @ diag(spacing) @ index`` with the index in
(x, y, z) order; arrays are returned as (Z, Y, X), what ``SimpleITK.GetArrayViewFromImage`` gives.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from medfm.errors import VolumeError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a volume: size (x, y, z), spacing (mm), origin (LPS mm) and direction (3×3)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # row-major 3×3, as SimpleITK gives it

    @property
    def matrix(self) -> np.ndarray:
        """The 4×4 affine from (x, y, z) voxel index to LPS world millimetres."""
        a = np.eye(4)
        a[:3, :3] = np.asarray(self.direction, dtype=float).reshape(3, 3) @ np.diag(self.spacing)
        a[:3, 3] = self.origin
        return a

    def index_to_world(self, index: np.ndarray) -> np.ndarray:
        """Map continuous (x, y, z) indices, shape (..., 3), to LPS world millimetres."""
        a = self.matrix
        return np.asarray(index, dtype=float) @ a[:3, :3].T + a[:3, 3]

    def world_to_index(self, world: np.ndarray) -> np.ndarray:
        """Map LPS world millimetres, shape (..., 3), to continuous (x, y, z) indices."""
        a = self.matrix
        return np.linalg.solve(a[:3, :3], (np.asarray(world, dtype=float) - a[:3, 3]).T).T

    @classmethod
    def of_image(cls, image: sitk.Image) -> Geometry:
        """The geometry of a SimpleITK image."""
        return cls(
            size=tuple(int(s) for s in image.GetSize()),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )


@dataclass
class Volume:
    """A read volume: its (Z, Y, X) voxel array (HU for CT) and its geometry."""

    array: np.ndarray
    geometry: Geometry
    path: str


def _check_3d(image: sitk.Image, path: str) -> sitk.Image:
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise VolumeError(path, f"expected a 3D volume, got {image.GetDimension()}D of size {image.GetSize()}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(path, f"expected one value per voxel, got {image.GetNumberOfComponentsPerPixel()}")
    return image


def dicom_series(folder: str | os.PathLike[str]) -> dict[str, list[str]]:
    """The DICOM series in a folder: series instance UID → its files sorted by slice position."""
    folder = str(folder)
    reader = sitk.ImageSeriesReader()
    uids = reader.GetGDCMSeriesIDs(folder) or ()
    return {uid: list(reader.GetGDCMSeriesFileNames(folder, uid)) for uid in uids}


EMPTY_UID = "<empty UID>"  # how a series whose SeriesInstanceUID is empty is listed, and chosen in a CSV manifest


def series_files(folder: str, series_uid: str | None) -> list[str]:
    """The files of a folder's DICOM series in slice order: the one series, or the one ``series_uid`` names."""
    series = dicom_series(folder)
    if not series:
        raise VolumeError(folder, "folder holds no DICOM series")
    if series_uid is not None:
        if series_uid not in series:
            raise VolumeError(folder, f"series {series_uid} not found; the folder holds {sorted(series)}")
        return series[series_uid]
    if len(series) > 1:
        listing = ", ".join(f"{uid or EMPTY_UID} ({len(f)} files)" for uid, f in sorted(series.items()))
        raise VolumeError(folder, f"folder holds {len(series)} DICOM series, choose one with series_uid: {listing}")
    return next(iter(series.values()))


STACK_TOLERANCE = 1e-3  # of the slice spacing: how far a slice may sit from the evenly spaced stack


@dataclass(frozen=True)
class DicomStack:
    """A single-frame DICOM series as one evenly spaced stack: its geometry from the headers, files in slice order."""

    folder: str
    files: tuple[str, ...]
    geometry: Geometry


def dicom_stack(folder: str | os.PathLike[str], series_uid: str | None = None) -> DicomStack | None:
    """The series that :func:`read_image` would read, described from its headers alone (pydicom, no pixel data), so
    that a box of it can be read without decoding every slice; None when the folder does not hold one clearly chosen,
    evenly spaced, parallel stack of single-frame images (such a series is read whole, with read_image's errors)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = str(folder)
    tags = ["SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
            "NumberOfFrames"]  # fmt: skip
    series: dict[str, list[tuple[str, Dataset]]] = {}
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return None
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
        except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError):
            continue  # not DICOM: the series reader ignores it too
        if "SeriesInstanceUID" in header:
            series.setdefault(str(header.SeriesInstanceUID or ""), []).append((path, header))
    if series_uid is None and len(series) == 1:
        chosen = next(iter(series.values()))
    elif series_uid is not None and series_uid in series:
        chosen = series[series_uid]
    else:
        return None
    if len(chosen) < 2:
        return None
    try:
        orientations = np.asarray([[float(v) for v in h.ImageOrientationPatient] for _, h in chosen])
        positions = np.asarray([[float(v) for v in h.ImagePositionPatient] for _, h in chosen])
        spacing_rc = [float(v) for v in chosen[0][1].PixelSpacing]
        frames = {int(h.get("NumberOfFrames") or 1) for _, h in chosen}
        shapes = {(int(h.Rows), int(h.Columns)) for _, h in chosen}
    except (AttributeError, TypeError, ValueError):
        return None  # a header lacks what a stack needs
    if frames != {1} or len(shapes) != 1 or np.ptp(orientations, axis=0).max() > 1e-4:
        return None
    row, col = orientations[0, :3], orientations[0, 3:]
    order = np.argsort(positions @ np.cross(row, col), kind="stable")  # slice order along the normal, as GDCM sorts
    positions = positions[order]
    step = (positions[-1] - positions[0]) / (len(chosen) - 1)
    dz = float(np.linalg.norm(step))
    expected = positions[0] + np.outer(np.arange(len(chosen)), step)
    if dz <= 0 or np.abs(positions - expected).max() > STACK_TOLERANCE * dz:
        return None
    ((rows, columns),) = shapes
    direction = np.column_stack([row, col, step / dz])  # ITK: the slice axis runs from the first file to the last
    geometry = Geometry(
        size=(columns, rows, len(chosen)),
        spacing=(spacing_rc[1], spacing_rc[0], dz),
        origin=tuple(float(v) for v in positions[0]),
        direction=tuple(direction.ravel().tolist()),
    )
    return DicomStack(folder, tuple(chosen[k][0] for k in order), geometry)


def read_stack_region(stack: DicomStack, start_xyz: tuple[int, int, int], size_xyz: tuple[int, int, int]) -> Volume:
    """Read only a box of a DICOM stack: the slices it spans are decoded, the rest are not opened."""
    (x0, y0, z0), (sx, sy, sz) = (tuple(int(v) for v in start_xyz), tuple(int(v) for v in size_xyz))
    n = len(stack.files)
    if sz < 1 or z0 < 0 or z0 + sz > n:
        raise VolumeError(stack.folder, f"slices {z0}…{z0 + sz - 1} asked of a {n}-slice series")
    first = min(z0, n - 2)  # ITK reads a series of at least two slices as a volume
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(stack.files[first : max(z0 + sz, first + 2)]))
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise _unreadable(stack.folder, err) from None
    array = sitk.GetArrayFromImage(_check_3d(image, stack.folder))
    array = array[z0 - first : z0 - first + sz, y0 : y0 + sy, x0 : x0 + sx]
    full = stack.geometry
    origin = full.index_to_world(np.asarray([x0, y0, z0], dtype=float))
    geometry = Geometry((sx, sy, sz), full.spacing, tuple(float(v) for v in origin), full.direction)
    return Volume(array=np.ascontiguousarray(array), geometry=geometry, path=stack.folder)


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _nifti_expected_bytes(path: str) -> int | None:
    """Bytes a single-file NIfTI-1/2 must hold (header, extensions, voxels), from its header; None if unknown."""
    with (gzip.open if _is_gzip(path) else open)(path, "rb") as f:
        hdr = f.read(540)
    for e in "<>":
        if len(hdr) >= 348 and struct.unpack(e + "i", hdr[:4])[0] == 348 and hdr[344:347] == b"n+1":
            dims, bitpix = struct.unpack(e + "8h", hdr[40:56]), struct.unpack(e + "h", hdr[72:74])[0]
            offset = int(struct.unpack(e + "f", hdr[108:112])[0])
        elif len(hdr) >= 540 and struct.unpack(e + "i", hdr[:4])[0] == 540 and hdr[4:7] == b"n+2":
            dims, bitpix = struct.unpack(e + "8q", hdr[16:80]), struct.unpack(e + "h", hdr[14:16])[0]
            offset = struct.unpack(e + "q", hdr[168:176])[0]
        else:
            continue
        if not 1 <= dims[0] <= 7 or bitpix <= 0:
            return None
        return offset + int(np.prod([max(int(d), 1) for d in dims[1 : dims[0] + 1]])) * bitpix // 8
    return None


def _check_nifti_complete(path: str) -> None:
    """Raise when a NIfTI file holds fewer voxel bytes than its header says (ITK fills the rest with 0)."""
    try:
        expected = _nifti_expected_bytes(path)
        if expected is None:
            return
        if not _is_gzip(path):  # by content: ITK reads a plain NIfTI named .nii.gz too
            have = os.path.getsize(path)
        else:
            with open(path, "rb") as f:  # fast path: the gzip trailer holds the size mod 2**32
                f.seek(-4, os.SEEK_END)
                if struct.unpack("<I", f.read(4))[0] == expected % 2**32:
                    return
            have = 0
            with gzip.open(path, "rb") as f:
                while have < expected and (chunk := f.read(1 << 22)):
                    have += len(chunk)
    except (EOFError, OSError, zlib.error):
        raise VolumeError(path, "file is truncated or corrupt (the compressed data ends early)") from None
    if have < expected:
        raise VolumeError(path, f"file is truncated: {have} of {expected} bytes of header and voxel data")


def _unreadable(path: str, err: RuntimeError) -> VolumeError:
    """ITK's multi-line exception as one short reason: its error line."""
    lines = str(err).strip().splitlines()
    detail = next((ln for ln in lines if "rror" in ln), lines[-1] if lines else "")
    return VolumeError(path, f"cannot be read ({detail.strip()[:200]})")


def read_image(path: str | os.PathLike[str], series_uid: str | None = None) -> sitk.Image:
    """Read a volume file or a DICOM series folder as a SimpleITK image (geometry kept exactly)."""
    path = str(path)
    if not os.path.exists(path):
        raise VolumeError(path, "file not found")
    try:
        if os.path.isdir(path):
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(series_files(path, series_uid))
            image = reader.Execute()
        else:
            if path.lower().endswith((".nii", ".nii.gz")):
                _check_nifti_complete(path)
            image = sitk.ReadImage(path)
    except RuntimeError as err:
        raise _unreadable(path, err) from None
    return _check_3d(image, path)


def read_volume(path: str | os.PathLike[str], series_uid: str | None = None) -> Volume:
    """Read a volume with its voxels as a (Z, Y, X) array in the file's own data type."""
    image = read_image(path, series_uid)
    array = sitk.GetArrayFromImage(image)
    if not np.issubdtype(array.dtype, np.number):
        raise VolumeError(str(path), f"unsupported voxel type {array.dtype}")
    return Volume(array=array, geometry=Geometry.of_image(image), path=str(path))


def read_region(
    path: str | os.PathLike[str], start_xyz: tuple[int, int, int], size_xyz: tuple[int, int, int]
) -> Volume:
    """Read only a box of voxels (start and size in (x, y, z) index) from a volume file, with its geometry.

    ITK streams the box from uncompressed files and stops decompressing compressed ones once past it, so a
    few lesion patches cost milliseconds instead of reading the whole scan.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise VolumeError(path, "file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        if path.lower().endswith((".nii", ".nii.gz")):
            _check_nifti_complete(path)
        reader.ReadImageInformation()
        extra = reader.GetDimension() - 3
        reader.SetExtractIndex([int(v) for v in start_xyz] + [0] * extra)
        reader.SetExtractSize([int(v) for v in size_xyz] + [1] * extra)
        image = reader.Execute()
    except RuntimeError as err:
        raise _unreadable(path, err) from None
    image = _check_3d(image, path)
    return Volume(array=sitk.GetArrayFromImage(image), geometry=Geometry.of_image(image), path=path)


def read_geometry(path: str | os.PathLike[str], series_uid: str | None = None) -> Geometry:
    """Read only the geometry of a volume (the header for files; the series for DICOM folders)."""
    path = str(path)
    if os.path.isdir(path) or not os.path.exists(path):
        return Geometry.of_image(read_image(path, series_uid))
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise VolumeError(path, "header cannot be read") from None
    dim = reader.GetDimension()
    if dim not in (3, 4) or (dim == 4 and reader.GetSize()[3] != 1):
        raise VolumeError(path, f"expected a 3D volume, got {dim}D of size {reader.GetSize()}")
    direction = np.asarray(reader.GetDirection(), dtype=float).reshape(dim, dim)[:3, :3]
    return Geometry(
        size=tuple(int(s) for s in reader.GetSize()[:3]),
        spacing=tuple(float(s) for s in reader.GetSpacing()[:3]),
        origin=tuple(float(o) for o in reader.GetOrigin()[:3]),
        direction=tuple(direction.ravel().tolist()),
    )


def write_volume(array: np.ndarray, geometry: Geometry, path: str | os.PathLike[str]) -> Path:
    """Write a (Z, Y, X) array with its geometry to any format SimpleITK knows by the suffix."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    sitk.WriteImage(image, str(path))
    return Path(path)
