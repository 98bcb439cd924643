"""``medfm segment predict``: run a trained segmenter on a manifest; masks keep the source image's exact geometry.

Each image goes through the model's own preprocessing (LPS axis order, the card's spacing and window; 2D: the
profile's resize), the sliding window of the card, and back: 3D masks are resampled by nearest neighbour onto the
source image's own voxel grid and written as NIfTI with its origin, spacing and direction (lossless when the
model ran at the native spacing); 2D class probabilities are mapped back through the resize before the argmax and
written as PNG at the image's size. Mask values are class indices (0 background, 1… in the card's class order).
``--overlays`` adds PNGs: three orthogonal slices through the predicted mask's centroid (3D) or the image (2D);
when the manifest has a ``mask_path`` column, a second row shows that reference mask on the same slices.
When the image is a DICOM series folder, a DICOM-SEG (:mod:`medfm.segment.dicomseg`) is written beside the NIfTI
(``dicom_seg``: ``auto``; ``always`` makes any other input a row error; ``never``); its file is the ``seg_path``
column of ``predictions.csv`` (empty where none was written). Under ``auto`` a series whose DICOM-SEG cannot be made
(e.g. instances without UIDs) keeps its NIfTI mask, and the reason goes to the row's ``warnings`` column and to the
console. Under ``always`` such a row is an error; with ``on_error="skip"`` it keeps its NIfTI mask and its line in
``predictions.csv`` and is reported in the errors file.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from medfm.data.images2d import preprocess2d, read_image2d
from medfm.data.io import Geometry, read_image, write_volume
from medfm.data.manifest import read_table, validate_manifest
from medfm.data.outputs import FinishedRows, atomic_path, pyplot, write_errors, write_figure, write_table
from medfm.data.profiles import Profile2D, profile_from_dict
from medfm.device import resolve_device
from medfm.errors import ConfigError, MedfmError, RowError, VolumeError
from medfm.progress import progress_bar
from medfm.segment.cases import (
    align_mask,
    hu_scaler,
    layout2d,
    mask_paths,
    prepare_volume,
    read_mask2d,
    restore_probabilities2d,
)
from medfm.segment.dicomseg import write_dicom_seg
from medfm.segment.labels import ClassMap
from medfm.segment.model import infer_logits
from medfm.segment.outputs import load_segmenter

DICOM_SEG_MODES = ("auto", "always", "never")
OUTPUT_FILES = ("mask_file", "overlay_file", "seg_path")  # the files a finished row wrote (resume checks them)
COLOURS = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#ffff33", "#a65628", "#f781bf")


def _stem(path: str) -> str:
    name = Path(path.rstrip("/")).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "image"


def write_mask_volume(array: np.ndarray, geometry: Geometry, dest: Path) -> Path:
    """Write a (Z, Y, X) mask with its geometry atomically (a temporary file with the same suffix, then rename)."""
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}" + ("".join(dest.suffixes[-2:]) or ".nii.gz"))
    try:
        write_volume(array, geometry, tmp)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def _overlay(
    slices: list[tuple[np.ndarray, np.ndarray, str]],
    names: list[str],
    dest: Path,
    reference: list[np.ndarray] | None = None,
) -> Path:
    """Grey images with their predicted class masks in colour, side by side; with ``reference`` (the manifest's
    ``mask_path``, one mask per slice) a second row shows the reference mask on the same slices, in the same colours,
    with the prediction's outline over it."""
    plt = pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colours = [COLOURS[i % len(COLOURS)] for i in range(len(names))]
    cmap = ListedColormap(["none", *colours])
    rows = [("prediction", [mask for _, mask, _ in slices])]
    if reference is not None:
        rows.append(("reference", list(reference)))
    size = (4 * len(slices), 4.2 * len(rows) + 0.4)
    fig, axes = plt.subplots(len(rows), len(slices), figsize=size, squeeze=False, layout="constrained")
    for r, (kind, masks) in enumerate(rows):
        for c, ((image, predicted, title), mask) in enumerate(zip(slices, masks)):
            ax = axes[r, c]
            ax.imshow(image, cmap="gray")
            ax.imshow(
                np.ma.masked_equal(mask, 0), cmap=cmap, vmin=0, vmax=len(names), alpha=0.45, interpolation="nearest"
            )
            if kind == "reference" and np.any(predicted):  # where the prediction lies, over the reference
                ax.contour(predicted > 0, levels=[0.5], colors="white", linewidths=0.8)
            ax.set_title(f"{kind} · {title}" if reference is not None else title, fontsize=9)
            ax.axis("off")
    handles = [Patch(color=colour, label=f"{i + 1} {name}") for i, (colour, name) in enumerate(zip(colours, names))]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(names), 6), fontsize=8, frameon=False)
    what = "prediction (top), reference mask (bottom, prediction outlined in white)" if reference is not None else ""
    fig.suptitle(f"{dest.name.removesuffix('_overlay.png')}  {what}".strip(), fontsize=9)
    return write_figure(fig, dest, dpi=90)


def orthogonal_slices(
    image: np.ndarray, mask: np.ndarray, spacing_zyx: tuple[float, ...], centre_of: np.ndarray | None = None
) -> list[tuple]:
    """Axial, coronal and sagittal slices of an LPS-ordered (Z, Y, X) volume through the centroid of ``centre_of``
    (default: of ``mask``), so a reference mask is cut on the same slices as the prediction."""
    centre_of = mask if centre_of is None else centre_of
    centre = np.argwhere(centre_of > 0).mean(axis=0) if np.any(centre_of) else np.array(mask.shape) / 2
    z, y, x = (int(round(c)) for c in centre)
    sz, sy, sx = spacing_zyx
    # rows upward in z for coronal/sagittal views (superior at the top); aspect by spacing
    axial = (image[z], mask[z], f"axial z={z}")
    coronal = (np.flipud(image[:, y, :]), np.flipud(mask[:, y, :]), f"coronal y={y}")
    sagittal = (np.flipud(image[:, :, x]), np.flipud(mask[:, :, x]), f"sagittal x={x}")
    out = []
    for img, msk, title in (axial, coronal, sagittal):
        factor = (sz / sx) if "axial" not in title else (sy / sx)
        reps = max(1, int(round(factor)))
        out.append((np.repeat(img, reps, axis=0), np.repeat(msk, reps, axis=0), title))
    return out


@torch.no_grad()
def predict_manifest(
    card_path: str | os.PathLike[str],
    manifest: str | os.PathLike[str],
    out: str | os.PathLike[str],
    overlays: bool = False,
    on_error: str = "raise",
    device: str = "auto",
    progress: bool = True,
    dicom_seg: str = "auto",
    resume: bool = False,
) -> Path:
    """Segment every image of a manifest (``image_path`` [+ ``series_uid``]); writes masks, overlays, DICOM-SEG
    and ``predictions.csv`` (the manifest's columns, the mask and DICOM-SEG files, each class's volume in ml or
    area in pixels). Each finished row is recorded in ``predictions.partial/``; ``resume=True`` keeps those rows
    (same card, manifest and options) and segments only the others."""
    if dicom_seg not in DICOM_SEG_MODES:
        raise ConfigError(f"dicom_seg must be one of {DICOM_SEG_MODES}, got {dicom_seg!r}")
    net, card = load_segmenter(card_path)
    device = resolve_device(device)
    net = net.to(device)
    profile = profile_from_dict(card["profile"], card["profile_spec"])
    is_2d = isinstance(profile, Profile2D)
    names = list(card["classes"])
    roi = None if card.get("patch_size") is None else tuple(card["patch_size"])
    overlap, sw_batch = float(card.get("overlap", 0.5)), int(card.get("sw_batch_size", 4))
    scale = None if is_2d else hu_scaler(profile, card.get("hu_window"))
    spacing = None if card.get("spacing") is None else tuple(card["spacing"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = str(manifest)
    checked = validate_manifest(read_table(source), source, Path(source).resolve().parent, seeds=False)
    errors = dict(checked.row_errors)
    if dicom_seg == "always":
        for row, path in enumerate(checked.paths):
            if row not in errors and (is_2d or not os.path.isdir(path)):
                what = "the model is 2D" if is_2d else "the image is not a DICOM series folder"
                errors[row] = f"--dicom-seg always: {what}; DICOM-SEG is written for DICOM series segmented in 3D"
    seg_info = _seg_identity(card, card_path)
    # overlays draw the reference mask beside the prediction when the manifest has one
    has_refs = overlays and "mask_path" in checked.table.columns
    references = mask_paths(checked.table, source) if has_refs else [None] * len(checked.table)
    class_map = _class_map(card)
    if errors and on_error == "raise":
        row = min(errors)
        raise RowError(row, checked.paths[row], errors[row])
    # overlays and dicom_seg are not part of the state: a kept row is reused when it has what they now ask for
    state = {"card_sha256": card.get("sha256"), "manifest": str(Path(source).resolve())}
    finished = FinishedRows(out / "predictions.partial", state, resume)
    records: dict[int, dict[str, object]] = {}
    with progress_bar(progress) as bar:
        task = bar.add_task("segmenting", total=len(checked.table))
        for row, path in enumerate(checked.paths):
            bar.advance(task)
            if row in errors:
                continue
            wants_seg = not is_2d and dicom_seg != "never" and os.path.isdir(path)
            kept = finished.get(f"row-{row:06d}", checked.row_digest(row))
            kept = _reusable(kept, out, overlays, wants_seg, dicom_seg)
            if kept is not None:
                records[row] = kept  # finished by an interrupted run, its files still there
                continue
            try:
                stem = f"{row:04d}_{_stem(path)}"
                ref = dict(reference=references[row], class_map=class_map)
                if is_2d:
                    record = _predict2d(net, path, profile, roi, overlap, sw_batch, names, out, stem, overlays, device,
                                        **ref)  # fmt: skip
                else:
                    record, mask, geometry = _predict3d(
                        net,
                        path,
                        checked.series_uid(row),
                        scale,
                        spacing,
                        roi,
                        overlap,
                        sw_batch,
                        names,
                        out,
                        stem,
                        overlays,
                        device,
                        **ref,
                    )
            except MedfmError as err:
                if on_error == "raise":
                    raise RowError(row, path, getattr(err, "reason", str(err))) from None
                errors[row] = getattr(err, "reason", str(err))
                continue
            record["seg_path"], record["warnings"] = "", ""
            if wants_seg:
                seg = out / f"{stem}.seg.dcm"
                try:
                    record["seg_path"] = write_dicom_seg(
                        mask, geometry, path, checked.series_uid(row), names, seg, **seg_info
                    ).name
                except MedfmError as err:
                    seg.unlink(missing_ok=True)  # not one left from an earlier run beside the new mask
                    reason = f"{getattr(err, 'reason', str(err))} (the NIfTI mask {record['mask_file']} was written)"
                    if dicom_seg == "auto":  # the NIfTI mask is the result; the SEG was a bonus
                        record["warnings"] = reason
                        warnings.warn(f"row {row} (image_path={path}): {reason}", stacklevel=2)
                    elif on_error == "raise":
                        raise RowError(row, path, reason) from None
                    else:
                        errors[row] = reason
            records[row] = record
            finished.put(f"row-{row:06d}", record, checked.row_digest(row))
    rows = sorted(records)
    table = checked.table.iloc[rows].copy()
    for key in dict.fromkeys(k for r in rows for k in records[r]):  # every key once, in first-seen order
        table[key] = [records[r].get(key, "") for r in rows]
    dest = write_table(table, out / "predictions.csv")
    write_errors(checked.table, errors, dest)
    finished.close()
    return dest


def _class_map(card: dict) -> ClassMap:
    """The card's raw mask value → class table; values it does not name are shown as background."""
    saved = card.get("class_map") or {}
    values = {int(k): int(v) for k, v in saved.get("values", {}).items()}
    return ClassMap(tuple(card["classes"]), values or {i + 1: i + 1 for i in range(len(card["classes"]))})


def _reusable(kept: dict | None, out: Path, overlays: bool, wants_seg: bool, dicom_seg: str) -> dict | None:
    """A row kept by an interrupted run, when its files are still there and it has what the options now ask for."""
    if kept is None or not all((out / str(kept[k])).is_file() for k in OUTPUT_FILES if kept.get(k)):
        return None
    if overlays and not kept.get("overlay_file"):
        return None
    if wants_seg and not kept.get("seg_path") and not (dicom_seg == "auto" and kept.get("warnings")):
        return None  # a SEG is wanted and the earlier run neither wrote one nor said why not
    if not overlays:
        kept.pop("overlay_file", None)
    if dicom_seg == "never" and kept.get("seg_path"):
        (out / str(kept["seg_path"])).unlink(missing_ok=True)
        kept["seg_path"] = ""
    return kept


def _seg_identity(card: dict, card_path: str | os.PathLike[str]) -> dict:
    """How a DICOM-SEG names the model: its name, a serial (the weights' SHA-256 prefix) and parameters."""
    encoder = str(card.get("encoder", {}).get("name", "unknown"))
    sha = str(card.get("sha256") or "")
    parameters = {"card": Path(card_path).name, "encoder": encoder}
    if sha:
        parameters["weights_sha256"] = sha
    return {
        "model_name": str(card.get("name") or f"U-Net on {encoder}"),
        "serial": sha[:16] or "unknown",
        "parameters": parameters,
    }


def _logits(net: torch.nn.Module, x: np.ndarray, roi, overlap: float, sw_batch: int, device: str) -> torch.Tensor:  # noqa: ANN001
    image = torch.from_numpy(x)[None].to(device)
    return infer_logits(net, image, roi, overlap, sw_batch)[0].float().cpu()


def _predict3d(net, path, uid, scale, spacing, roi, overlap, sw_batch, names, out, stem, overlays, device,  # noqa: ANN001
               reference: str | None = None, class_map: ClassMap | None = None) -> tuple:  # fmt: skip
    image = read_image(path, uid)
    x, grid = prepare_volume(image, scale, spacing)
    pred = _logits(net, x, roi, overlap, sw_batch, device).argmax(dim=0).numpy().astype(np.uint8)
    on_grid = sitk.GetImageFromArray(pred)
    on_grid.CopyInformation(grid)
    back = sitk.Resample(on_grid, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    mask = sitk.GetArrayFromImage(back)
    geometry = Geometry.of_image(image)
    dest = write_mask_volume(mask, geometry, out / f"{stem}_mask.nii.gz")
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    record: dict[str, object] = {"mask_file": dest.name}
    for k, name in enumerate(names):
        record[f"volume_ml/{name}"] = float(np.sum(mask == k + 1)) * voxel_ml
    if overlays:
        spacing_zyx = tuple(grid.GetSpacing()[::-1])
        slices = orthogonal_slices(x[0], pred, spacing_zyx)
        shown = None
        if reference is not None:
            truth = _reference3d(image, grid, reference, class_map)
            shown = [m for _, m, _ in orthogonal_slices(x[0], truth, spacing_zyx, centre_of=pred)]
        record["overlay_file"] = _overlay(slices, names, out / f"{stem}_overlay.png", shown).name
    return record, mask, geometry


def _reference3d(image: sitk.Image, grid: sitk.Image, path: str, class_map: ClassMap) -> np.ndarray:
    """The manifest's reference mask as class indices on the model's grid (nearest neighbour), as training reads it."""
    try:
        on_image, _ = align_mask(image, read_image(path))
    except ValueError as err:
        raise VolumeError(f"reference mask {path} does not lie on the image's grid: {err}") from None
    on_grid = sitk.Resample(on_image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return class_map.encode(sitk.GetArrayFromImage(on_grid), where=f"reference mask {path}")


def _predict2d(net, path, profile, roi, overlap, sw_batch, names, out, stem, overlays, device,  # noqa: ANN001
               reference: str | None = None, class_map: ClassMap | None = None) -> dict:  # fmt: skip
    from PIL import Image

    image = read_image2d(path)
    x = preprocess2d(image, profile)
    h, w = image.array.shape[:2]
    prob = _logits(net, x, roi, overlap, sw_batch, device).softmax(dim=0)
    mask = restore_probabilities2d(prob, layout2d(h, w, profile)).argmax(dim=0).numpy().astype(np.uint8)
    dest = out / f"{stem}_mask.png"
    with atomic_path(dest) as tmp:
        Image.fromarray(mask).save(tmp, format="PNG")
    record: dict[str, object] = {"mask_file": dest.name}
    for k, name in enumerate(names):
        record[f"area_px/{name}"] = int(np.sum(mask == k + 1))
    if overlays:
        grey = image.array if image.array.ndim == 2 else image.array.mean(axis=2)
        shown = None
        if reference is not None:
            truth = read_mask2d(reference)
            if truth.shape[:2] != (h, w):
                raise VolumeError(
                    f"reference mask {reference} is {truth.shape[0]}×{truth.shape[1]} pixels, the image {h}×{w}"
                )
            shown = [class_map.encode(truth, where=f"reference mask {reference}")]
        dest = out / f"{stem}_overlay.png"
        record["overlay_file"] = _overlay([(grey, mask, Path(path).name)], names, dest, shown).name
    return record
