"""What a detection run leaves behind, and how a trained detector is run on new images.

In the run folder: ``results.json`` (test mAP@[thresholds] (``map``; ``map_40_75`` at the default ones), mAP@0.5,
mAP@0.75, recall and the Kaggle RSNA pneumonia score ``rsna_score`` with bootstrap CIs,
per-class AP, best epoch, sizes, initialisation and its transfer coverage), ``curves.csv``/``curves.png``
(per-epoch validation mAP and training loss), ``model.safetensors`` (the whole detector) and its card
``model.json`` (architecture, classes, trunk, the input profile with its full definition, metrics, SHA-256).
:func:`predict_boxes` runs a card (or a Lightning checkpoint of ``medfm detect fit``) on a manifest and writes
boxes in each image's own pixel coordinates, with overlays of predicted and true boxes when asked.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from medfm.data.outputs import pyplot, write_errors, write_figure, write_json, write_table, write_weights
from medfm.data.profiles import Profile2D
from medfm.detect.boxes import read_boxes
from medfm.detect.data import DetectData, load_image
from medfm.detect.module import DetectModule
from medfm.device import resolve_device
from medfm.errors import ConfigError, MedfmError, ModelError, RowError
from medfm.models import hub
from medfm.models.checkpoints import read_checkpoint
from medfm.progress import progress_bar
from medfm.train.curves import write_curves
from medfm.train.outputs import write_splits

CARD_KIND = "medfm-detector"


def _module_args(hparams: dict) -> dict:
    """The saved hyperparameters that are :class:`DetectModule` arguments (LightningCLI adds its own keys)."""
    names = set(inspect.signature(DetectModule.__init__).parameters) - {"self"}
    return {k: v for k, v in hparams.items() if k in names}


OUT_COLUMNS = ["image_path", "x_min", "y_min", "x_max", "y_max", "label", "score"]


def write_run_outputs(module: DetectModule, data: DetectData, folder: str | os.PathLike[str]) -> Path:
    """results.json, curves, model.safetensors and model.json of a finished run; returns the card's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hp = module.hparams
    report = module.init_report
    results = {
        "arch": hp.arch,
        "trunk": hp.trunk,
        "classes": list(hp.classes),
        "init": hp.init,
        "init_coverage": getattr(report, "coverage", None),
        "freeze": hp.freeze,
        "train_fraction": data.hparams.train_fraction,
        "fraction_seed": data.hparams.fraction_seed,
        "iou_thresholds": list(module.thresholds),
        "sizes": data.sizes(),
        "best": module.best,
        "test": module.test_results,
        "per_class": module.test_per_class,
    }
    write_json(results, folder / "results.json")
    rows = [(row, split) for item, split in zip(data.items, data.splits) for row in item.rows]  # an image's rows
    write_splits(folder, [r for r, _ in rows], [s for _, s in rows], data.boxes.table)
    write_curves(module.history, folder, f"detection {hp.arch} on {hp.trunk} ({hp.init}) · {', '.join(hp.classes)}")
    weights = write_weights(module, folder / "model.safetensors")
    card = {
        "kind": CARD_KIND,
        "hparams": _module_args(dict(hp)) | {"init": "random"},
        "trained_from": hp.init,
        "classes": list(hp.classes),
        "profile": data.profile.name,
        "profile_spec": data.profile.to_dict(),
        "weights": weights.name,
        "sha256": hub.sha256_of(weights),
        "metrics": module.test_results,
        "best": module.best,
    }
    return write_json(card, folder / "model.json")


def load_detector(path: str | os.PathLike[str]) -> tuple[DetectModule, Profile2D]:
    """The trained detector (eval mode) and its input profile, from a ``model.json`` card or a ``.ckpt``."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: file not found")
    if path.suffix == ".ckpt":
        checkpoint = read_checkpoint(path)  # refuses, in one line, a file that could run code or holds NaN weights
        hparams = dict(checkpoint.get("hyper_parameters", {}))
        data = dict(checkpoint.get("datamodule_hyper_parameters", {}))
        if "classes" not in hparams or "manifest" not in data:
            raise ModelError(f"{path}: not a checkpoint of `medfm detect fit` (no model classes or data settings)")
        from medfm.detect.data import detection_profile

        profile = detection_profile(data.get("profile", "gray-224"), data.get("image_size"))
        state = checkpoint["state_dict"]
    else:
        try:
            card = json.loads(path.read_text())
        except ValueError as err:
            raise ModelError(f"{path}: not a JSON model card ({err})") from None
        if card.get("kind") != CARD_KIND:
            raise ModelError(f"{path}: not a detector card (kind {card.get('kind')!r})")
        weights = path.parent / card["weights"]
        if card.get("sha256") and hub.sha256_of(weights) != card["sha256"]:
            raise ModelError(f"{weights}: SHA-256 differs from the card's; the file was changed or replaced")
        hparams = dict(card["hparams"])
        spec = {k: tuple(v) if isinstance(v, list) else v for k, v in card["profile_spec"].items()}
        profile = Profile2D(**spec)
        state = load_file(str(weights))
    hparams = _module_args(hparams) | {"init": "random"}  # the weights below replace the trunk's start
    module = DetectModule(**hparams)
    module.load_state_dict(state, strict=True)
    return module.eval(), profile


LABEL_POINTS = 7.0  # font size of the overlay labels
OVERLAY_INCHES, OVERLAY_DPI = 6.0, 100  # the image's long side as drawn


def _label_size(text: str, scale: float) -> tuple[float, float]:
    """A label's width and height in image pixels (``scale``: display pixels per image pixel), a little generous:
    digits are ~0.64 em wide in DejaVu Sans, plus the label's padding."""
    em = LABEL_POINTS * OVERLAY_DPI / 72
    return (em * (0.66 * len(text) + 0.8)) / scale, (em * 1.6) / scale


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Area shared by two (x0, y0, x1, y1) rectangles."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def place_labels(
    boxes: list[tuple[float, float, float, float]], sizes: list[tuple[float, float]], width: float, height: float
) -> list[tuple[float, float]]:
    """Top-left corners of box labels (image pixels, y down) that do not cover each other and stay inside the image.

    Each label tries, in order: above its box, below it, the same at the box's right edge, inside its top, then
    staggered further above and below one label height at a time; every place is clipped into the image, and the
    first that covers no label already placed is taken (or, when none is free, the one covering least).
    """
    placed: list[tuple[float, float, float, float]] = []
    corners: list[tuple[float, float]] = []
    for (x0, y0, x1, y1), (lw, lh) in zip(boxes, sizes):
        tries = [(x0, y0 - lh), (x0, y1), (x1 - lw, y0 - lh), (x1 - lw, y1), (x0, y0)]
        for k in range(1, 2 * int(height / max(lh, 1e-6)) + 2):
            tries += [(x0, y0 - lh * (k + 1)), (x0, y1 + lh * k), (x1 - lw, y0 - lh * (k + 1)), (x1 - lw, y1 + lh * k)]
        best, best_cover = None, np.inf
        for x, y in tries:
            x, y = min(max(x, 0.0), max(width - lw, 0.0)), min(max(y, 0.0), max(height - lh, 0.0))
            rect = (x, y, x + lw, y + lh)
            cover = sum(_overlap(rect, other) for other in placed)
            if cover < best_cover:
                best, best_cover = rect, cover
            if cover == 0:
                break
        placed.append(best)
        corners.append(best[:2])
    return corners


def _draw(path: str, out: Path, predicted: pd.DataFrame, truth: np.ndarray, truth_labels: list[str]) -> Path:
    """An overlay figure: true boxes green with their class, predicted boxes red with class and score; labels placed
    so that they do not cover each other (:func:`place_labels`) and stay inside the image."""
    from matplotlib.patches import Rectangle

    from medfm.data.images2d import read_image2d

    array = read_image2d(path).array
    grey = np.clip(array if array.ndim == 2 else array.mean(axis=2), 0, 1)
    height, width = grey.shape
    scale = OVERLAY_INCHES * OVERLAY_DPI / max(height, width)
    drawn = [(tuple(float(v) for v in box), label, "#00dc00") for box, label in zip(truth, truth_labels)]
    kept = predicted.dropna(subset=["x_min"]).sort_values("score", ascending=False)
    drawn += [
        (tuple(float(r[c]) for c in ("x_min", "y_min", "x_max", "y_max")), f"{r['label']} {r['score']:.2f}", "#e61e1e")
        for _, r in kept.iterrows()
    ]
    corners = place_labels([d[0] for d in drawn], [_label_size(d[1], scale) for d in drawn], width, height)
    plt = pyplot()
    image_h = height * scale / OVERLAY_DPI
    fig = plt.figure(figsize=(width * scale / OVERLAY_DPI, image_h + 0.35), dpi=OVERLAY_DPI)
    ax = fig.add_axes((0, 0, 1, image_h / (image_h + 0.35)))
    ax.imshow(grey, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.axis("off")
    line = max(1.0, scale / 4)
    pad = 0.15 * LABEL_POINTS * OVERLAY_DPI / 72 / scale  # the label's background reaches this far out of its text
    for (box, label, colour), (x, y) in zip(drawn, corners):
        ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False, ec=colour, lw=line))
        ax.text(x + pad, y + pad, label, color=colour, fontsize=LABEL_POINTS, ha="left", va="top", clip_on=True,
                bbox={"boxstyle": "square,pad=0.15", "fc": "black", "alpha": 0.55, "lw": 0})  # fmt: skip
    fig.suptitle(f"{Path(path).name}: reference boxes green, predicted red (score)", fontsize=8)
    return write_figure(fig, out, dpi=OVERLAY_DPI)


@torch.no_grad()
def predict_boxes(
    model_path: str | os.PathLike[str],
    manifest: str | os.PathLike[str],
    out: str | os.PathLike[str],
    overlays: str | os.PathLike[str] | None = None,
    score_threshold: float = 0.5,
    format: str = "auto",
    batch_size: int = 8,
    on_error: str = "raise",
    progress: bool = True,
    device: str = "auto",
) -> Path:
    """Run a trained detector on a manifest's images (on ``device``; ``auto`` takes a GPU when there is one); write
    ``image_path, x_min, y_min, x_max, y_max, label, score`` in each image's own pixel coordinates (the resize
    undone), one empty-box row for an image with no box above ``score_threshold``. ``overlays``: a folder of PNGs
    with predicted (red) and true (green) boxes."""
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error={on_error!r}; allowed 'raise' or 'skip'")
    module, profile = load_detector(model_path)
    device = resolve_device(device)
    module = module.to(device)
    classes = list(module.hparams.classes)
    boxes = read_boxes(manifest, format, classes if format != "coco" else None)
    if on_error == "raise":
        boxes.raise_first()
    errors = dict(boxes.row_errors)
    items = boxes.images()
    rows: list[dict] = []
    overlay_dir = Path(overlays) if overlays else None
    with progress_bar(progress) as bar:
        task = bar.add_task("detecting", total=len(items))
        for start in range(0, len(items), batch_size):
            bar.advance(task, len(items[start : start + batch_size]))
            chunk, tensors, frames = [], [], []
            for position, item in enumerate(items[start : start + batch_size], start=start):
                try:
                    tensor, frame, _ = load_image(item.path, profile)
                except MedfmError as err:
                    reason = getattr(err, "reason", str(err))
                    if on_error == "raise":
                        raise RowError(item.rows[0], item.image_path, reason) from None
                    errors.update({r: reason for r in item.rows})
                    continue
                chunk.append((position, item))
                tensors.append(tensor.to(device))
                frames.append(frame)
            if not chunk:
                continue
            detections = [{k: v.cpu() for k, v in det.items()} for det in module(tensors)]
            for (position, item), frame, det in zip(chunk, frames, detections):
                keep = det["scores"] >= score_threshold
                found = frame.inverse(det["boxes"][keep].numpy())
                found[:, [0, 2]] = np.clip(found[:, [0, 2]], 0, item.width)
                found[:, [1, 3]] = np.clip(found[:, [1, 3]], 0, item.height)
                labels = det["labels"][keep].tolist()
                scores = det["scores"][keep].tolist()
                image_rows = [
                    {
                        "image_path": item.image_path,
                        **dict(zip(OUT_COLUMNS[1:5], map(float, box))),
                        "label": classes[k],
                        "score": float(s),
                    }
                    for box, k, s in zip(found, labels, scores)
                ] or [{"image_path": item.image_path}]
                rows.extend(image_rows)
                if overlay_dir is not None:
                    name = f"{position:05d}_{Path(item.path).stem}.png"
                    names = [classes[k] for k in item.labels] if boxes.has_boxes else []
                    _draw(
                        item.path, overlay_dir / name, pd.DataFrame(image_rows, columns=OUT_COLUMNS), item.boxes, names
                    )
    table = pd.DataFrame(rows, columns=OUT_COLUMNS)
    path = write_table(table, out)
    write_errors(boxes.table, errors, out)
    return path
