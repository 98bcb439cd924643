"""Read volumes (NIfTI, NRRD, MHA/MHD, DICOM series folders) with their exact geometry.

Geometry follows ITK: ``world_LPS = origin + direction @ diag(spacing) @ index`` with the index in
(x, y, z) order; arrays are returned as (Z, Y, X), what ``SimpleITK.GetArrayViewFromImage`` gives.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from medfm.data.nifti import check_complete, form_disagreement, nonfinite_voxels
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
    note: str | None = None  # what was irregular about it when it was read anyway (a resampled DICOM series)


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


STACK_TOLERANCE = 0.05  # of the slice step: how far a slice may sit from its place in an evenly spaced stack
POSITION_TOLERANCE_MM = 0.06  # …but never less: positions are often written rounded to 0.1 mm (0.05 mm off)
IRREGULAR_SERIES = ("refuse", "resample")  # what to do with a series that has gaps or changing slice spacing


@dataclass(frozen=True)
class DicomStack:
    """A single-frame DICOM series as one stack: its evenly spaced grid from the headers, files in slice order.

    ``offsets`` (mm, each file's distance from the first along the slice axis) and ``irregularity`` are set when
    the files are not evenly spaced and the series is read anyway: the grid then runs at the finest slice step and
    its slices are interpolated from the files by position.
    """

    folder: str
    files: tuple[str, ...]
    geometry: Geometry
    offsets: tuple[float, ...] | None = None
    irregularity: str | None = None


_STACK_TAGS = ["SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows",
               "Columns", "NumberOfFrames", "InstanceNumber"]  # fmt: skip


def _dicom_header(path: str) -> Dataset | None:
    """The header tags a stack needs, without pixel data; None when the file is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_STACK_TAGS)
    except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError):
        return None  # not DICOM: the series reader ignores it too


def _mm(value: float) -> str:
    """Millimetres as a person writes them: 5.0, 2.5, 0.625."""
    return f"{value:.1f}" if abs(value * 10 - round(value * 10)) < 1e-6 else f"{value:.3f}".rstrip("0")


def _pair(a: str, b: str) -> str:
    """Two slices by name: 'instance 11 and 12', or two file names."""
    return f"{a} and {b.removeprefix('instance ') if a.startswith('instance ') else b}"


def _describe_spacing(steps: np.ndarray, labels: list[str]) -> str:
    """What is wrong with the spacing of a stack's slices, naming the two slices where it first goes wrong."""
    rounded = np.round(steps, 2)
    values, counts = np.unique(rounded, return_counts=True)
    usual = float(values[np.argmax(counts)])  # the commonest step; ties go to the smaller

    def between(i: int) -> str:
        return f"between {_pair(labels[i], labels[i + 1])}"

    for i, step in enumerate(steps):
        k = step / usual
        if round(k) >= 2 and abs(k - round(k)) < 0.1:
            missing = round(k) - 1
            return (f"gap of {_mm(step)} mm {between(i)}, expected {_mm(usual)} mm "
                    f"({missing} slice{'s' if missing > 1 else ''} missing)")  # fmt: skip
    first = float(steps[0])
    for i, step in enumerate(steps):
        if abs(step - first) > STACK_TOLERANCE * first:
            rest = steps[i:]
            if np.all(np.abs(rest - step) <= STACK_TOLERANCE * step):
                return f"slice spacing changes from {_mm(first)} mm to {_mm(step)} mm {between(i)}"
            return f"uneven slice spacing: {_mm(step)} mm {between(i)} after {_mm(first)} mm"
    return "slices are not evenly spaced"


def _stack_layout(folder: str, uid: str, chosen: list[tuple[str, Dataset]], irregular: str) -> DicomStack | None:
    """Check that a series' headers describe one clean stack and lay it out; the one place both readers check.

    None when the headers lack what a stack needs (multi-frame files, missing tags, one file): such a series is read
    whole by ITK. A slice of another orientation or a duplicated position is always refused; a gap or a change of
    spacing is refused unless ``irregular='resample'``.
    """
    if irregular not in IRREGULAR_SERIES:
        raise ValueError(f"irregular={irregular!r}; allowed {IRREGULAR_SERIES}")
    if len(chosen) < 2:
        return None
    try:
        orientations = np.asarray([[float(v) for v in h.ImageOrientationPatient] for _, h in chosen])
        positions = np.asarray([[float(v) for v in h.ImagePositionPatient] for _, h in chosen])
        spacing_rc = [float(v) for v in chosen[0][1].PixelSpacing]
        frames = {int(h.get("NumberOfFrames") or 1) for _, h in chosen}
        shapes = {(int(h.Rows), int(h.Columns)) for _, h in chosen}
    except (AttributeError, TypeError, ValueError, IndexError):
        return None  # a header lacks what a stack needs
    if frames != {1} or len(shapes) != 1 or orientations.shape[1] != 6 or positions.shape[1] != 3:
        return None
    name = f"series {uid or EMPTY_UID}"
    labels = [
        f"instance {h.InstanceNumber}" if h.get("InstanceNumber") not in (None, "") else os.path.basename(p)
        for p, h in chosen
    ]
    keys, counts = np.unique(np.round(orientations, 4), axis=0, return_counts=True)
    usual = keys[np.argmax(counts)]
    odd = np.flatnonzero(np.abs(orientations - usual).max(axis=1) > 1e-4)
    if len(odd):
        shown = ", ".join(labels[i] for i in odd[:3]) + (f" and {len(odd) - 3} more" if len(odd) > 3 else "")
        other = tuple(round(float(v), 4) for v in orientations[odd[0]])
        raise VolumeError(folder, f"{name}: {len(odd)} of {len(chosen)} slices have another orientation ({shown}: "
                          f"{other}, the others {tuple(float(v) for v in usual)}); the series is not one stack")  # fmt: skip
    row, col = orientations[0, :3], orientations[0, 3:]
    order = np.argsort(positions @ np.cross(row, col), kind="stable")  # slice order along the normal, as GDCM sorts
    positions, labels = positions[order], [labels[k] for k in order]
    files = tuple(chosen[k][0] for k in order)
    steps = np.diff(positions @ np.cross(row, col))
    usual_step = float(np.median(steps))
    same = np.flatnonzero(steps <= STACK_TOLERANCE * max(usual_step, 1e-6))
    if len(same):
        i = int(same[0])
        at = tuple(round(float(v), 3) for v in positions[i])
        raise VolumeError(folder, f"{name}: {_pair(labels[i], labels[i + 1])} lie at the same position {at} mm "
                          f"(a duplicated slice; {len(same)} such pair{'s' if len(same) > 1 else ''}); "
                          "keep one of them")  # fmt: skip
    step = (positions[-1] - positions[0]) / (len(chosen) - 1)
    dz = float(np.linalg.norm(step))
    expected = positions[0] + np.outer(np.arange(len(chosen)), step)
    ((rows, columns),) = shapes
    if np.abs(positions - expected).max() <= max(STACK_TOLERANCE * dz, POSITION_TOLERANCE_MM):
        direction = np.column_stack([row, col, step / dz])  # ITK: the slice axis runs from the first file to the last
        geometry = Geometry((columns, rows, len(chosen)), (spacing_rc[1], spacing_rc[0], dz),
                            tuple(float(v) for v in positions[0]), tuple(direction.ravel().tolist()))  # fmt: skip
        return DicomStack(folder, files, geometry)
    problem = _describe_spacing(steps, labels) if len(steps) > 1 else "slices are not evenly spaced"
    if irregular == "refuse":
        raise VolumeError(folder, f"{name}: {problem}; to read it anyway, interpolating slices by their position, "
                          "use --irregular-series resample (irregular_series='resample')")  # fmt: skip
    axis = (positions[-1] - positions[0]) / np.linalg.norm(positions[-1] - positions[0])
    offsets = (positions - positions[0]) @ axis
    off_line = np.linalg.norm(positions - positions[0] - np.outer(offsets, axis), axis=1).max()
    if off_line > STACK_TOLERANCE * float(steps.min()):
        raise VolumeError(folder, f"{name}: {problem}, and the slices do not lie on one line "
                          f"(up to {_mm(off_line)} mm off it); the series cannot be resampled")  # fmt: skip
    extent = float(offsets[-1])
    count = int(round(extent / float(np.min(np.diff(offsets))))) + 1
    direction = np.column_stack([row, col, axis])
    geometry = Geometry((columns, rows, count), (spacing_rc[1], spacing_rc[0], extent / (count - 1)),
                        tuple(float(v) for v in positions[0]), tuple(direction.ravel().tolist()))  # fmt: skip
    return DicomStack(folder, files, geometry, tuple(float(v) for v in offsets), f"{name}: {problem}")


def dicom_stack(
    folder: str | os.PathLike[str], series_uid: str | None = None, irregular: str = "refuse"
) -> DicomStack | None:
    """The series that :func:`read_image` would read, described from its headers alone (pydicom, no pixel data), so
    that a box of it can be read without decoding every slice.

    Raises :class:`VolumeError` for a series that is not one clean stack (see :func:`_stack_layout`); None when the
    folder does not hold one clearly chosen series of single-frame images (it is read whole, with read_image's
    errors).
    """
    folder = str(folder)
    series: dict[str, list[tuple[str, Dataset]]] = {}
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return None
    for name in names:
        path = os.path.join(folder, name)
        header = _dicom_header(path) if os.path.isfile(path) else None
        if header is not None and "SeriesInstanceUID" in header:
            series.setdefault(str(header.SeriesInstanceUID or ""), []).append((path, header))
    if series_uid is None and len(series) == 1:
        uid, chosen = next(iter(series.items()))
    elif series_uid is not None and series_uid in series:
        uid, chosen = series_uid, series[series_uid]
    else:
        return None
    return _stack_layout(folder, uid, chosen, irregular)


def _interpolate_slices(array: np.ndarray, offsets: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Slices at ``targets`` (mm along the slice axis), linear between the two files that enclose each by position."""
    j = np.clip(np.searchsorted(offsets, targets, side="right") - 1, 0, len(offsets) - 2)
    w = np.clip((targets - offsets[j]) / (offsets[j + 1] - offsets[j]), 0.0, 1.0)[:, None, None]
    return ((1.0 - w) * array[j] + w * array[j + 1]).astype(np.float32)


def read_stack_region(stack: DicomStack, start_xyz: tuple[int, int, int], size_xyz: tuple[int, int, int]) -> Volume:
    """Read only a box of a DICOM stack: the slices it spans are decoded, the rest are not opened."""
    (x0, y0, z0), (sx, sy, sz) = (tuple(int(v) for v in start_xyz), tuple(int(v) for v in size_xyz))
    n = stack.geometry.size[2]
    if sz < 1 or z0 < 0 or z0 + sz > n:
        raise VolumeError(stack.folder, f"slices {z0}…{z0 + sz - 1} asked of a {n}-slice series")
    if stack.offsets is None:
        first, stop = min(z0, n - 2), None  # ITK reads a series of at least two slices as a volume
        stop = max(z0 + sz, first + 2)
    else:  # the files that enclose the grid's slices z0…z0+sz-1 by position
        offsets = np.asarray(stack.offsets)
        targets = (z0 + np.arange(sz)) * stack.geometry.spacing[2]
        first = int(np.clip(np.searchsorted(offsets, targets[0], side="right") - 1, 0, len(offsets) - 2))
        stop = int(np.clip(np.searchsorted(offsets, targets[-1], side="left") + 1, first + 2, len(offsets)))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(stack.files[first:stop]))
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise _unreadable(stack.folder, err) from None
    array = sitk.GetArrayFromImage(_check_3d(image, stack.folder))[:, y0 : y0 + sy, x0 : x0 + sx]
    if stack.offsets is None:
        array = array[z0 - first : z0 - first + sz]
    else:
        array = _interpolate_slices(array, offsets[first:stop], targets)
    full = stack.geometry
    origin = full.index_to_world(np.asarray([x0, y0, z0], dtype=float))
    geometry = Geometry((sx, sy, sz), full.spacing, tuple(float(v) for v in origin), full.direction)
    return Volume(np.ascontiguousarray(array), geometry, stack.folder, stack.irregularity)


def _check_header(reader: sitk.ImageFileReader, path: str) -> None:
    """Refuse from the header alone what ITK cannot read as one scalar 3D volume (a region read of a vector NIfTI
    crashes the process), before any voxel is read."""
    dim, size = reader.GetDimension(), reader.GetSize()
    if dim not in (3, 4) or (dim == 4 and size[3] != 1):
        raise VolumeError(path, f"expected a 3D volume, got {dim}D of size {size}")
    if reader.GetNumberOfComponents() != 1:
        raise VolumeError(path, f"expected one value per voxel, got {reader.GetNumberOfComponents()} "
                          "(a vector or RGB image); give a scalar volume")  # fmt: skip


def _unreadable(path: str, err: RuntimeError) -> VolumeError:
    """ITK's multi-line exception as one short reason: its error line."""
    lines = str(err).strip().splitlines()
    detail = next((ln for ln in lines if "rror" in ln), lines[-1] if lines else "")
    return VolumeError(path, f"cannot be read ({detail.strip()[:200]})")


def read_image(path: str | os.PathLike[str], series_uid: str | None = None, irregular: str = "refuse") -> sitk.Image:
    """Read a volume file or a DICOM series folder as a SimpleITK image (geometry kept exactly).

    A series is checked to be one clean stack first (see :func:`dicom_stack`); ``irregular='resample'`` reads a
    series with gaps or changing spacing onto an evenly spaced grid, interpolating by slice position.
    """
    path = str(path)
    if not os.path.exists(path):
        raise VolumeError(path, "file not found")
    try:
        if os.path.isdir(path):
            files = series_files(path, series_uid)
            headers = [(f, h) for f in files if (h := _dicom_header(f)) is not None]
            uid = (
                series_uid
                if series_uid is not None
                else str(headers[0][1].get("SeriesInstanceUID", ""))
                if headers
                else ""
            )
            stack = _stack_layout(path, uid, headers, irregular) if len(headers) == len(files) else None
            if stack is not None:
                volume = read_stack_region(stack, (0, 0, 0), stack.geometry.size)
                image = sitk.GetImageFromArray(volume.array)
                image.SetSpacing(volume.geometry.spacing)
                image.SetOrigin(volume.geometry.origin)
                image.SetDirection(volume.geometry.direction)
                return image
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            if path.lower().endswith((".nii", ".nii.gz")):
                check_complete(path)
            reader = sitk.ImageFileReader()
            reader.SetFileName(path)
            reader.ReadImageInformation()
            _check_header(reader, path)
            image = reader.Execute()
            if (hidden := nonfinite_voxels(path)) is not None and len(hidden):
                warnings.warn(
                    f"{path}: {len(hidden)} NaN/Inf voxels (first at voxel {tuple(int(v) for v in hidden[0])}), which "
                    "SimpleITK reads from NIfTI as 0",
                    stacklevel=2,
                )
    except RuntimeError as err:
        raise _unreadable(path, err) from None
    image = _check_3d(image, path)
    if not os.path.isdir(path) and (note := form_disagreement(path, Geometry.of_image(image).matrix)):
        warnings.warn(note, stacklevel=2)
    return image


def read_volume(path: str | os.PathLike[str], series_uid: str | None = None, irregular: str = "refuse") -> Volume:
    """Read a volume with its voxels as a (Z, Y, X) array in the file's own data type (float32 when resampled)."""
    if os.path.isdir(path) and (stack := dicom_stack(path, series_uid, irregular)) is not None:
        return read_stack_region(stack, (0, 0, 0), stack.geometry.size)
    image = read_image(path, series_uid, irregular)
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
            check_complete(path)
        reader.ReadImageInformation()
        _check_header(reader, path)
        extra = reader.GetDimension() - 3
        reader.SetExtractIndex([int(v) for v in start_xyz] + [0] * extra)
        reader.SetExtractSize([int(v) for v in size_xyz] + [1] * extra)
        image = reader.Execute()
    except RuntimeError as err:
        raise _unreadable(path, err) from None
    image = _check_3d(image, path)
    return Volume(array=sitk.GetArrayFromImage(image), geometry=Geometry.of_image(image), path=path)


def read_geometry(path: str | os.PathLike[str], series_uid: str | None = None, irregular: str = "refuse") -> Geometry:
    """Read only the geometry of a volume (the header for files; the headers, else the series, for DICOM folders)."""
    path = str(path)
    if os.path.isdir(path) and (stack := dicom_stack(path, series_uid, irregular)) is not None:
        return stack.geometry
    if os.path.isdir(path) or not os.path.exists(path):
        return Geometry.of_image(read_image(path, series_uid, irregular))
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise VolumeError(path, "header cannot be read") from None
    _check_header(reader, path)
    dim = reader.GetDimension()
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
