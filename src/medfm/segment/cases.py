"""Segmentation cases: an image and its mask read, checked to lie on one grid, and prepared for the network.

3D (NIfTI, NRRD, MHA, DICOM series folders via :mod:`medfm.data.io`): the mask must share the image's grid — size,
spacing, origin and direction within ``tolerance`` (relative for spacing, in voxels for the origin, absolute for the
direction cosines). A mask stored on the same voxels in another axis order or sense (a DICOM series and a NIfTI
export of its segmentation) is reoriented without interpolation; any other difference is an error naming it. Both
are then turned to the LPS axis order (a lossless permutation/flip, so every scan looks the same way up) and, when
``spacing`` is given, resampled (image linearly, mask by nearest neighbour). Arrays are (Z, Y, X); intensities are
scaled by the profile's HU window.

2D (PNG, JPEG, TIFF, single-frame DICOM): the image goes through its 2D profile (:func:`preprocess2d`); the mask,
read with its raw integer values, must have the image's height and width, and is resized the same way (nearest).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from medfm.data.images2d import intensity_warning2d, preprocess2d, read_image2d
from medfm.data.io import read_image
from medfm.data.manifest import read_table, validate_manifest
from medfm.data.profiles import Profile, Profile2D
from medfm.errors import ConfigError, ManifestError, MedfmError, RowError, VolumeError
from medfm.progress import progress_bar
from medfm.segment.labels import ClassMap

GEOMETRY_TOLERANCE = 1e-3


@dataclass
class Case:
    """A prepared case: network input (C, *spatial), class indices (*spatial) or None, mm per voxel (array order)."""

    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, ...]
    row: int
    note: str = ""


# --- 3D grids ------------------------------------------------------------------------------------------------


def grid_differences(image: sitk.Image, mask: sitk.Image, tolerance: float = GEOMETRY_TOLERANCE) -> list[str]:
    """How the mask's voxel grid differs from the image's (empty when they agree within ``tolerance``)."""
    diffs = []
    if image.GetSize() != mask.GetSize():
        diffs.append(f"size {list(mask.GetSize())} vs the image's {list(image.GetSize())}")
    sp_i, sp_m = np.array(image.GetSpacing()), np.array(mask.GetSpacing())
    if np.any(np.abs(sp_i - sp_m) > tolerance * sp_i):
        diffs.append(f"spacing {np.round(sp_m, 4).tolist()} mm vs {np.round(sp_i, 4).tolist()} mm")
    delta = np.array(mask.GetOrigin()) - np.array(image.GetOrigin())
    if np.linalg.norm(delta) > tolerance * float(sp_i.min()):
        diffs.append(f"origin differs by {np.round(delta, 3).tolist()} mm")
    d_i, d_m = np.array(image.GetDirection()), np.array(mask.GetDirection())
    if np.max(np.abs(d_i - d_m)) > tolerance:
        diffs.append(f"direction {np.round(d_m, 3).tolist()} vs {np.round(d_i, 3).tolist()}")
    return diffs


def orientation_code(image: sitk.Image) -> str:
    """The image's closest axis-aligned orientation as DICOM letters (e.g. ``LPS``)."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def align_mask(image: sitk.Image, mask: sitk.Image, tolerance: float = GEOMETRY_TOLERANCE) -> tuple[sitk.Image, str]:
    """The mask on the image's grid and a note; ValueError naming the differences when it is not the same grid."""
    diffs = grid_differences(image, mask, tolerance)
    if not diffs:
        return mask, ""
    reoriented = sitk.DICOMOrient(mask, orientation_code(image))
    if not grid_differences(image, reoriented, tolerance):
        return reoriented, f"mask stored in {orientation_code(mask)} order, reoriented to the image's voxels"
    raise ValueError("; ".join(diffs))


def to_model_grid(image: sitk.Image, spacing: tuple[float, float, float] | None, label: bool = False) -> sitk.Image:
    """The image in LPS axis order (lossless), resampled to ``spacing`` (x, y, z mm) over the same extent if given."""
    oriented = sitk.DICOMOrient(image, "LPS")
    if spacing is None:
        return oriented
    old_spacing = np.array(oriented.GetSpacing())
    new_spacing = np.asarray(spacing, dtype=float)
    if np.allclose(old_spacing, new_spacing, rtol=1e-3, atol=0):
        return oriented
    size = np.array(oriented.GetSize())
    new_size = np.maximum(1, np.round(size * old_spacing / new_spacing)).astype(int)
    direction = np.array(oriented.GetDirection()).reshape(3, 3)
    # the first voxel's outer corner stays where it was: the new grid covers the same extent
    shift = (new_spacing - old_spacing) / 2
    origin = np.array(oriented.GetOrigin()) + direction @ shift
    interpolator = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    source = oriented if label else sitk.Cast(oriented, sitk.sitkFloat32)
    return sitk.Resample(
        source,
        [int(s) for s in new_size],
        sitk.Transform(),
        interpolator,
        origin.tolist(),
        new_spacing.tolist(),
        oriented.GetDirection(),
        0.0 if label else float(sitk.GetArrayViewFromImage(source).min()),
        source.GetPixelID(),
    )


def hu_scaler(profile: Profile, hu_window: tuple[float, float] | None) -> Callable[[np.ndarray], np.ndarray]:
    """The profile's HU scaling, or a linear map of ``hu_window`` to [0, 1] (clipped) when one is given."""
    if hu_window is None:
        return profile.scale
    low, high = (float(v) for v in hu_window)
    if not high > low:
        raise ConfigError(f"hu_window {hu_window} must rise")
    return lambda hu: np.clip((np.asarray(hu, dtype=np.float32) - low) / (high - low), 0.0, 1.0).astype(np.float32)


def prepare_volume(
    image: sitk.Image,
    scale: Callable[[np.ndarray], np.ndarray],
    spacing: tuple[float, float, float] | None,
) -> tuple[np.ndarray, sitk.Image]:
    """Network input (1, Z, Y, X) of a volume and the SimpleITK grid it lies on (LPS order, resampled)."""
    grid = to_model_grid(image, spacing)
    array = sitk.GetArrayFromImage(grid)
    return scale(array)[None].astype(np.float32), grid


def load_case3d(
    row: int,
    image_path: str,
    mask_path: str | None,
    classes: ClassMap,
    scale: Callable[[np.ndarray], np.ndarray],
    spacing: tuple[float, float, float] | None = None,
    series_uid: str | None = None,
    tolerance: float = GEOMETRY_TOLERANCE,
    profile: Profile | None = None,
) -> Case:
    """Read, check and prepare one 3D case; RowError naming the row, the files and the reason."""
    try:
        image = read_image(image_path, series_uid)
        if profile is not None and (
            warning := profile.intensity_warning(sitk.GetArrayViewFromImage(image), whole=True)
        ):
            warnings.warn(f"{image_path}: {warning}", stacklevel=2)
        x, grid = prepare_volume(image, scale, spacing)
        if mask_path is None:
            return Case(x, None, tuple(grid.GetSpacing()[::-1]), row)
        mask = read_image(mask_path)
        try:
            mask, note = align_mask(image, mask, tolerance)
        except ValueError as err:
            raise RowError(row, image_path, f"mask {mask_path} does not lie on the image's grid: {err}") from None
        mask_grid = to_model_grid(mask, spacing, label=True)
        label = classes.encode(sitk.GetArrayFromImage(mask_grid), where=f"mask {mask_path}")
    except VolumeError as err:
        raise RowError(row, image_path, str(err)) from None
    except ValueError as err:
        raise RowError(row, image_path, str(err)) from None
    return Case(x, label, tuple(grid.GetSpacing()[::-1]), row, note)


# --- 2D images -----------------------------------------------------------------------------------------------


def read_mask2d(path: str | os.PathLike[str]) -> np.ndarray:
    """A 2D mask's raw integer label values (H, W): PNG/TIFF palette or grey values, DICOM stored pixel values."""
    path = str(path)
    if not os.path.isfile(path):
        raise VolumeError(path, "file not found")
    if path.lower().endswith((".dcm", ".dicom")):
        import pydicom

        try:
            array = np.asarray(pydicom.dcmread(path).pixel_array)
        except Exception as err:  # pydicom raises many kinds
            raise VolumeError(path, f"DICOM mask cannot be decoded ({str(err).splitlines()[0][:200]})") from None
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                image.load()
                array = np.asarray(image)
        except (UnidentifiedImageError, OSError) as err:
            raise VolumeError(path, f"cannot be read as a mask ({err})") from None
    if array.ndim == 3:  # a grey mask saved as RGB(A): every colour channel must agree
        if not np.all(array[..., :3] == array[..., :1]):
            raise VolumeError(path, "colour mask: save label values as a grey or palette image")
        array = array[..., 0]
    if array.ndim != 2:
        raise VolumeError(path, f"expected a 2D mask, got an array of shape {array.shape}")
    return array


@dataclass(frozen=True)
class Layout2D:
    """Where an (h, w) image lands in a profile's output: scaled to (sh, sw), its top-left at (top, left)."""

    height: int
    width: int
    scaled: tuple[int, int]
    top: int
    left: int
    out: tuple[int, int]


def layout2d(height: int, width: int, profile: Profile2D) -> Layout2D:
    """The resize of :func:`preprocess2d` as numbers (so masks and predictions follow the image exactly)."""
    th, tw = profile.size
    if profile.resize == "resize":
        return Layout2D(height, width, (th, tw), 0, 0, (th, tw))
    if profile.resize == "shorter-crop":
        scale = max(th / height, tw / width)
        sh, sw = max(th, round(height * scale)), max(tw, round(width * scale))
        return Layout2D(height, width, (sh, sw), -((sh - th) // 2), -((sw - tw) // 2), (th, tw))
    scale = min(th / height, tw / width)
    sh, sw = max(1, round(height * scale)), max(1, round(width * scale))
    return Layout2D(height, width, (sh, sw), (th - sh) // 2, (tw - sw) // 2, (th, tw))


def _paste(scaled: torch.Tensor, layout: Layout2D, fill: float = 0.0) -> torch.Tensor:
    """Place a (C, sh, sw) tensor into the (C, th, tw) output at the layout's offset (cropping what falls out)."""
    th, tw = layout.out
    out = torch.full((scaled.shape[0], th, tw), fill, dtype=scaled.dtype)
    sh, sw = layout.scaled
    y0, x0 = max(0, layout.top), max(0, layout.left)
    y1, x1 = min(th, layout.top + sh), min(tw, layout.left + sw)
    out[:, y0:y1, x0:x1] = scaled[:, y0 - layout.top : y1 - layout.top, x0 - layout.left : x1 - layout.left]
    return out


def resize_mask2d(label: np.ndarray, layout: Layout2D) -> np.ndarray:
    """Class indices (h, w) → the profile's output size by nearest neighbour, padded with background."""
    x = torch.from_numpy(label.astype(np.float32))[None, None]
    scaled = F.interpolate(x, size=layout.scaled, mode="nearest-exact")[0]
    return _paste(scaled, layout).round().long()[0].numpy()


def restore_probabilities2d(prob: torch.Tensor, layout: Layout2D) -> torch.Tensor:
    """Class probabilities (K, th, tw) on the profile's grid → (K, h, w) on the source image's pixels."""
    sh, sw = layout.scaled
    back = torch.zeros((prob.shape[0], sh, sw), dtype=prob.dtype)
    back[0] = 1.0  # what the profile cropped away is background
    th, tw = layout.out
    y0, x0 = max(0, layout.top), max(0, layout.left)
    y1, x1 = min(th, layout.top + sh), min(tw, layout.left + sw)
    back[:, y0 - layout.top : y1 - layout.top, x0 - layout.left : x1 - layout.left] = prob[:, y0:y1, x0:x1]
    return F.interpolate(back[None], size=(layout.height, layout.width), mode="bilinear", align_corners=False)[0]


def pixel_spacing2d(path: str) -> tuple[float, float]:
    """(row, column) pixel spacing in mm of a DICOM image, or (1, 1) — distances in pixels — for other files."""
    if path.lower().endswith((".dcm", ".dicom")):
        import pydicom

        spacing = pydicom.dcmread(path, stop_before_pixels=True).get("PixelSpacing")
        if spacing is not None and len(spacing) == 2:
            return float(spacing[0]), float(spacing[1])
    return 1.0, 1.0


def load_case2d(row: int, image_path: str, mask_path: str | None, classes: ClassMap, profile: Profile2D) -> Case:
    """Read, check and prepare one 2D case; RowError naming the row, the files and the reason."""
    try:
        image = read_image2d(image_path)
        if warning := intensity_warning2d(image):
            warnings.warn(warning, stacklevel=2)
        x = preprocess2d(image, profile)
        h, w = image.array.shape[:2]
        layout = layout2d(h, w, profile)
        ps = pixel_spacing2d(image_path)
        spacing = (ps[0] * h / layout.scaled[0], ps[1] * w / layout.scaled[1])
        if mask_path is None:
            return Case(x, None, spacing, row)
        raw = read_mask2d(mask_path)
        if raw.shape != (h, w):
            raise RowError(
                row, image_path, f"mask {mask_path} is {raw.shape[0]}×{raw.shape[1]} pixels, the image {h}×{w}"
            )
        label = resize_mask2d(classes.encode(raw, where=f"mask {mask_path}"), layout)
    except VolumeError as err:
        raise RowError(row, image_path, str(err)) from None
    except ValueError as err:
        raise RowError(row, image_path, str(err)) from None
    return Case(x, label, spacing, row)


# --- manifests -----------------------------------------------------------------------------------------------


@dataclass
class CaseSet:
    """The good cases of a mask manifest (in row order), the table, and the bad rows with their reasons."""

    cases: list[Case]
    table: pd.DataFrame
    errors: dict[int, str]
    source: str


def mask_paths(table: pd.DataFrame, source: str, column: str = "mask_path") -> list[str | None]:
    """The mask column's paths resolved against the manifest's folder (None where a row has no mask)."""
    if column not in table.columns:
        raise ManifestError(f"manifest {source}: missing column {column!r}; it has {list(table.columns)}")
    base = Path(source).resolve().parent
    out: list[str | None] = []
    for value in table[column]:
        if pd.isna(value) or str(value).strip() == "":
            out.append(None)
            continue
        p = Path(str(value).strip()).expanduser()
        out.append(str(p if p.is_absolute() else base / p))
    return out


def load_cases(
    manifest: str | os.PathLike[str],
    classes: ClassMap,
    profile: Profile | Profile2D,
    spacing: tuple[float, float, float] | None = None,
    hu_window: tuple[float, float] | None = None,
    tolerance: float = GEOMETRY_TOLERANCE,
    on_error: str = "raise",
    need_masks: bool = True,
    progress: bool = False,
) -> CaseSet:
    """Read every row of a mask manifest (``image_path, mask_path`` + any columns) into prepared cases.

    ``on_error="raise"`` stops at the first bad row with its row, files and reason; ``"skip"`` collects the bad
    rows in ``errors`` and keeps every good one.
    """
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error={on_error!r}; allowed raise, skip")
    source = str(manifest)
    table = read_table(source)
    checked = validate_manifest(table, source, Path(source).resolve().parent, seeds=False)
    masks = mask_paths(checked.table, source) if need_masks or "mask_path" in table.columns else [None] * len(table)
    errors: dict[int, str] = {}
    for row, reason in checked.row_errors.items():
        errors[row] = f"image {checked.paths[row] or '(empty)'}: {reason}"
    for row, mask in enumerate(masks):
        if row in errors:
            continue
        if mask is None and need_masks:
            errors[row] = "column mask_path is empty"
        elif mask is not None and not os.path.exists(mask):
            errors[row] = f"mask {mask}: file not found"
    if errors and on_error == "raise":
        row = min(errors)
        raise RowError(row, checked.paths[row], errors[row])
    is_2d = isinstance(profile, Profile2D)
    scale = None if is_2d else hu_scaler(profile, hu_window)
    cases: list[Case] = []
    with progress_bar(progress) as bar:
        task = bar.add_task("reading cases", total=len(table))
        for row in range(len(table)):
            bar.advance(task)
            if row in errors:
                continue
            try:
                if is_2d:
                    case = load_case2d(row, checked.paths[row], masks[row], classes, profile)
                else:
                    case = load_case3d(
                        row,
                        checked.paths[row],
                        masks[row],
                        classes,
                        scale,
                        spacing,
                        checked.series_uid(row),
                        tolerance,
                        profile,
                    )
            except MedfmError as err:
                if on_error == "raise":
                    raise
                errors[row] = getattr(err, "reason", str(err))
                continue
            cases.append(case)
    if not cases:
        raise ManifestError(f"manifest {source}: no usable row ({len(errors)} bad; first: {errors[min(errors)]})")
    return CaseSet(cases, checked.table, errors, source)
