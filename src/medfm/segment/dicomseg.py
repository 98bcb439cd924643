"""DICOM-SEG of a predicted mask: a binary DICOM Segmentation object (highdicom) referencing the source series.

The source series is the one :func:`medfm.data.io.read_image` reads (the same ``series_uid`` selection). Its
instances are sorted by their position along the slice normal, and every frame of the segmentation is the mask
sampled at that instance's pixels through both geometries (DICOM: ``ImagePositionPatient`` +
``column × PixelSpacing[1] × row cosine + row × PixelSpacing[0] × column cosine``; the mask: its ITK
origin/spacing/direction), so the result does not depend on how the mask's axes are ordered or flipped. A pixel
whose position falls off the mask's voxel centres by more than a tenth of a voxel is an error, not a resampling.
One segment per class (numbers 1…K in the card's class order, the class name as label), algorithm type AUTOMATIC;
frames are written only where a segment is present. Generic terminology: SNOMED CT "Tissue" as category and type
(3D Slicer's default), since a model card does not say what its classes are anatomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

import medfm
from medfm.data.io import Geometry, series_files
from medfm.data.outputs import atomic_path
from medfm.errors import VolumeError

GRID_TOLERANCE = 0.1  # voxels: how far a source pixel may lie from the mask's nearest voxel centre
COLOURS_RGB = ((228, 26, 28), (55, 126, 184), (77, 175, 74), (152, 78, 163), (255, 127, 0), (255, 255, 51))
REFERENCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID")
# type 2 patient/study attributes highdicom copies from the source; an absent one becomes empty, as DICOM allows
TYPE2_SOURCE_ATTRIBUTES = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
                           "StudyID", "StudyDate", "StudyTime")  # fmt: skip


def _plane(ds: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Position, row and column direction cosines, row and column spacing (mm) of a single-frame instance."""
    missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in ds]
    if missing:
        raise ValueError(f"instance {ds.get('SOPInstanceUID', '?')} lacks {', '.join(missing)}")
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    spacing = [float(v) for v in ds.PixelSpacing]
    return np.asarray([float(v) for v in ds.ImagePositionPatient]), iop[:3], iop[3:], spacing[0], spacing[1]


def series_datasets(folder: str | os.PathLike[str], series_uid: str | None = None) -> list[Dataset]:
    """The headers of the series that reading selects, sorted by position along the slice normal; VolumeError
    when they cannot be referenced by a DICOM-SEG (missing UIDs, multi-frame images, mixed orientations)."""
    folder = str(folder)
    datasets = []
    for path in series_files(folder, series_uid):
        try:
            datasets.append(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception as err:  # pydicom raises many kinds
            detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise VolumeError(folder, f"DICOM header of {path} cannot be read ({detail})") from None
    lacking = [k for k in REFERENCE_UIDS if any(not str(ds.get(k) or "").strip() for ds in datasets)]
    if lacking:
        raise VolumeError(
            folder,
            f"the series' instances lack {', '.join(lacking)} (absent or empty, as some de-identification leaves "
            "them); a DICOM-SEG must reference its source by these UIDs",
        )
    frames = [int(ds.get("NumberOfFrames", 1) or 1) for ds in datasets]
    if any(n > 1 for n in frames):
        raise VolumeError(folder, "DICOM-SEG is written for series of single-frame images, not multi-frame ones")
    try:
        planes = [_plane(ds) for ds in datasets]
    except ValueError as err:
        raise VolumeError(folder, str(err)) from None
    _, row0, col0, _, _ = planes[0]
    if any(not np.allclose(np.r_[row, col], np.r_[row0, col0], atol=1e-4) for _, row, col, _, _ in planes):
        raise VolumeError(folder, "the series' instances differ in ImageOrientationPatient")
    normal = np.cross(row0, col0)
    order = np.argsort([float(pos @ normal) for pos, *_ in planes], kind="stable")
    return [datasets[i] for i in order]


def mask_on_slices(
    mask: np.ndarray, geometry: Geometry, datasets: Sequence[Dataset], tolerance: float = GRID_TOLERANCE
) -> np.ndarray:
    """A (Z, Y, X) mask on ``geometry`` sampled at every instance's pixels: (N, Rows, Columns) in the datasets' order;
    ValueError when a pixel does not lie on a voxel centre of the mask or falls outside it."""
    if mask.shape != tuple(geometry.size[::-1]):
        raise ValueError(f"mask of shape {mask.shape} does not match its geometry of size {list(geometry.size)}")
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    r, c = np.mgrid[:rows, :cols]
    out = np.zeros((len(datasets), rows, cols), dtype=mask.dtype)
    upper = np.asarray(geometry.size) - 1
    for i, ds in enumerate(datasets):
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise ValueError(f"instance {ds.SOPInstanceUID} is {ds.Rows}×{ds.Columns} pixels, others {rows}×{cols}")
        position, row_cos, col_cos, row_spacing, col_spacing = _plane(ds)
        world = position + (c[..., None] * col_spacing) * row_cos + (r[..., None] * row_spacing) * col_cos
        index = geometry.world_to_index(world.reshape(-1, 3))
        nearest = np.rint(index)
        off = float(np.abs(index - nearest).max())
        if off > tolerance:
            raise ValueError(
                f"instance {ds.SOPInstanceUID} (ImagePositionPatient {np.round(position, 3).tolist()}) lies "
                f"{off:.2f} voxels off the mask's grid"
            )
        if np.any(nearest < 0) or np.any(nearest > upper):
            raise ValueError(
                f"instance {ds.SOPInstanceUID} (ImagePositionPatient {np.round(position, 3).tolist()}) lies "
                "outside the mask's volume"
            )
        x, y, z = nearest.astype(np.intp).T
        out[i] = mask[z, y, x].reshape(rows, cols)
    return out


def segment_descriptions(
    names: Sequence[str], model_name: str, version: str, parameters: dict[str, str] | None = None
) -> list[hd.seg.SegmentDescription]:
    """One highdicom SegmentDescription per class: numbers 1…K, label = class name, AUTOMATIC by medfm."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"medfm {model_name}"[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=version[:64],
        source="medfm",
        parameters=parameters,
    )
    out = []
    for k, name in enumerate(names):
        out.append(
            hd.seg.SegmentDescription(
                segment_number=k + 1,
                segment_label=str(name).replace("\\", "/")[:64],
                segmented_property_category=codes.SCT.Tissue,
                segmented_property_type=codes.SCT.Tissue,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                display_color=hd.color.CIELabColor.from_rgb(*COLOURS_RGB[k % len(COLOURS_RGB)]),
            )
        )
    return out


def build_segmentation(
    frames: np.ndarray,
    datasets: Sequence[Dataset],
    names: Sequence[str],
    model_name: str,
    serial: str = "unknown",
    parameters: dict[str, str] | None = None,
) -> hd.seg.Segmentation:
    """A binary highdicom Segmentation of class-index ``frames`` (N, Rows, Columns) over the sorted ``datasets``."""
    frames = np.asarray(frames)
    if frames.size and int(frames.max()) > len(names):
        raise ValueError(f"mask holds class {int(frames.max())} but the model has {len(names)} classes")
    datasets = [_with_type2(ds) for ds in datasets]
    series_number = int(datasets[0].get("SeriesNumber") or 0) + 1000
    return hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=frames.astype(np.uint8 if len(names) < 256 else np.uint16),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(names, model_name, medfm.__version__, parameters),
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medfm",
        manufacturer_model_name=model_name[:64],
        software_versions=medfm.__version__,
        device_serial_number=serial[:64],
        series_description=f"medfm {model_name}"[:64],
        content_description=f"automatic segmentation by medfm {medfm.__version__}"[:64],
    )


def _with_type2(ds: Dataset) -> Dataset:
    """A shallow copy of a header with absent type 2 patient/study attributes present and empty."""
    missing = [k for k in TYPE2_SOURCE_ATTRIBUTES if k not in ds]
    if not missing:
        return ds
    ds = ds.copy()
    for key in missing:
        setattr(ds, key, "")
    return ds


def write_dicom_seg(
    mask: np.ndarray,
    geometry: Geometry,
    folder: str | os.PathLike[str],
    series_uid: str | None,
    names: Sequence[str],
    dest: str | os.PathLike[str],
    model_name: str,
    serial: str = "unknown",
    parameters: dict[str, str] | None = None,
) -> Path:
    """Write the DICOM-SEG of a (Z, Y, X) class-index mask on ``geometry`` for the DICOM series in ``folder``
    (atomically); VolumeError naming the folder and the reason when it cannot be made."""
    folder = str(folder)
    try:
        datasets = series_datasets(folder, series_uid)
        frames = mask_on_slices(np.asarray(mask), geometry, datasets)
    except VolumeError as err:
        raise VolumeError(folder, f"DICOM-SEG cannot be made: {err.reason}") from None
    except ValueError as err:
        raise VolumeError(folder, f"DICOM-SEG cannot be made: {err}") from None
    try:
        seg = build_segmentation(frames, datasets, names, model_name, serial, parameters)
    except Exception as err:  # highdicom checks the source headers and raises many kinds
        detail = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        raise VolumeError(folder, f"DICOM-SEG cannot be made: {detail}") from None
    dest = Path(dest)
    try:
        with atomic_path(dest) as tmp:
            seg.save_as(tmp)
    except OSError as err:
        raise VolumeError(folder, f"DICOM-SEG cannot be written to {dest} ({err})") from None
    return dest
