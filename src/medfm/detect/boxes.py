"""Box manifests: CSV rows of pixel boxes, YOLO ``.txt`` files beside the images, or a COCO json — read and checked.

Every format becomes one :class:`BoxTable`: one row per box, in the pixel coordinates of the image as stored
(``x_min, y_min, x_max, y_max``: edges, x to the right, y down, 0 at the image's top-left corner), or one row
with empty box columns for an image without boxes (a negative). Each row remembers where it came from
(``manifest.csv row 3``, ``12.txt line 2``, ``COCO annotation id 17``) so that an error names the row, the file
and the reason. Checks: the image exists and can be opened; the box lies inside the image (edges up to
``tolerance`` of the side outside are clipped, for rounded YOLO/COCO numbers); its area is positive; its label is
known. A bad row takes its whole image out (an image with a box missing would teach the model to miss it): the
row gets the reason, the image's other rows say which row was bad.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medfm.data.manifest import read_table
from medfm.errors import ConfigError, ManifestError, RowError

BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")
FORMATS = ("auto", "csv", "yolo", "coco", "images")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom")


@dataclass
class ImageBoxes:
    """The checked boxes of one image: (n, 4) float32 pixel edges and (n,) class indices (n = 0: a negative)."""

    path: str
    image_path: str
    rows: list[int]
    boxes: np.ndarray
    labels: np.ndarray
    height: int
    width: int
    extra: dict = field(default_factory=dict)


@dataclass
class BoxTable:
    """Boxes of a set of images, one row per box (or per negative image), with per-row problems.

    ``table`` has ``image_path`` (as given), the box columns, ``label``, ``source`` and any other column of the
    manifest; ``paths`` are the resolved image files; ``classes`` the class names (index = class id);
    ``has_boxes`` is False for a plain list of images (nothing to score against); ``knock_on`` are good rows
    left out because another row of their image is bad; ``declared`` the (height, width) the manifest states for
    an image (COCO), which must be the file's.
    """

    table: pd.DataFrame
    paths: list[str]
    classes: list[str]
    source: str
    row_errors: dict[int, str] = field(default_factory=dict)
    has_boxes: bool = True
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    knock_on: set[int] = field(default_factory=set)
    declared: dict[str, tuple[int, int]] = field(default_factory=dict)  # (height, width) a COCO file states

    def __len__(self) -> int:
        return len(self.table)

    def raise_first(self) -> None:
        """Raise :class:`RowError` for the first bad row, if any."""
        primary = [r for r in self.row_errors if r not in self.knock_on] or list(self.row_errors)
        if primary:
            row = min(primary)
            raise RowError(row, self.table["image_path"].iloc[row], self.row_errors[row])

    def images(self, extra_columns: tuple[str, ...] = ()) -> list[ImageBoxes]:
        """The good images in order of first appearance, each with its boxes in pixels and class indices."""
        lookup = {name: i for i, name in enumerate(self.classes)}
        groups: dict[str, list[int]] = {}
        for row, path in enumerate(self.paths):
            groups.setdefault(path, []).append(row)
        out = []
        coords = self.table[list(BOX_COLUMNS)].to_numpy(dtype=float)
        for path, rows in groups.items():
            if any(r in self.row_errors for r in rows):
                continue
            boxed = [r for r in rows if np.isfinite(coords[r]).all()]
            height, width = self.shapes[path]
            first = self.table.iloc[rows[0]]
            out.append(
                ImageBoxes(
                    path=path,
                    image_path=str(first["image_path"]),
                    rows=rows,
                    boxes=coords[boxed].astype(np.float32).reshape(-1, 4),
                    labels=np.array([lookup[self.table["label"].iloc[r]] for r in boxed], dtype=np.int64),
                    height=height,
                    width=width,
                    extra={c: first[c] for c in extra_columns if c in self.table.columns},
                )
            )
        return out


def image_shape(path: str) -> tuple[int, int]:
    """(height, width) of an image file from its header (PIL, or the DICOM Rows/Columns), without decoding it."""
    if path.lower().endswith((".dcm", ".dicom")):
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        return int(ds.Rows), int(ds.Columns)
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
    return int(height), int(width)


def _label_name(value: object) -> str | None:
    """A label as text: ``1`` and ``1.0`` (a CSV column with gaps becomes float) are both ``"1"``."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    text = str(value).strip()
    return text or None


def _sorted_names(names: set[str]) -> list[str]:
    """Class names in natural order: numerically when they are all integers, else alphabetically."""
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _resolve(value: object, base: Path) -> str:
    p = Path(str(value).strip()).expanduser()
    return str(p if p.is_absolute() else base / p)


def check_boxes(boxes: BoxTable, tolerance: float = 0.01) -> BoxTable:
    """Check every row (image readable, box inside it with positive area, label known), clip edges that stick out
    by less than ``tolerance`` of the side, and mark every row of an image with a bad row. Returns ``boxes``."""
    table = boxes.table
    known = set(boxes.classes)
    errors = boxes.row_errors
    for path in dict.fromkeys(boxes.paths):
        if path in boxes.shapes or not path:
            continue
        if not os.path.isfile(path):
            continue
        try:
            boxes.shapes[path] = image_shape(path)
        except Exception as err:  # PIL / pydicom raise many kinds; the reason is what matters
            boxes.shapes[path] = (0, 0)
            for row in (r for r, p in enumerate(boxes.paths) if p == path):
                errors.setdefault(row, f"cannot be read as an image ({str(err).splitlines()[0][:160]})")
    coords = table[list(BOX_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float, copy=True)
    for row, path in enumerate(boxes.paths):
        if row in errors:
            continue
        if not path:
            errors[row] = "column image_path is empty"
            continue
        if not os.path.isfile(path):
            errors[row] = "file not found"
            continue
        if path in boxes.declared and boxes.declared[path] != boxes.shapes[path]:
            (h, w), (fh, fw) = boxes.declared[path], boxes.shapes[path]
            errors[row] = f"the manifest says the image is {w}×{h} but the file is {fw}×{fh}: boxes would be misplaced"
            continue
        given = table[list(BOX_COLUMNS)].iloc[row]
        present = given.notna().to_numpy()
        if not present.any():
            continue  # a negative image
        if not present.all() or not np.isfinite(coords[row]).all():
            values = ", ".join(f"{c}={v!r}" for c, v in zip(BOX_COLUMNS, given.tolist()))
            errors[row] = f"box columns must be four finite numbers or all empty (a negative image); got {values}"
            continue
        height, width = boxes.shapes[path]
        x0, y0, x1, y1 = coords[row]
        slack_x, slack_y = tolerance * width, tolerance * height
        if x0 < -slack_x or y0 < -slack_y or x1 > width + slack_x or y1 > height + slack_y:
            errors[row] = f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) lies outside the {width}×{height} image"
            continue
        x0, x1 = np.clip([x0, x1], 0, width)
        y0, y1 = np.clip([y0, y1], 0, height)
        if not (x1 > x0 and y1 > y0):
            errors[row] = f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) has no area (x_max must exceed x_min, y_max y_min)"
            continue
        coords[row] = (x0, y0, x1, y1)
        label = table["label"].iloc[row]
        if label is None or label not in known:
            errors[row] = f"label {label!r} is not one of the classes {boxes.classes}"
    table[list(BOX_COLUMNS)] = coords
    bad_images: dict[str, int] = {}
    for row in sorted(errors):
        bad_images.setdefault(boxes.paths[row], row)
    for row, path in enumerate(boxes.paths):
        if path in bad_images and row not in errors:
            errors[row] = f"row {bad_images[path]} of the same image is bad; the image is left out"
            boxes.knock_on.add(row)
    return boxes


def _finish(table: pd.DataFrame, paths: list[str], classes: list[str], source: str, **kw: object) -> BoxTable:
    return BoxTable(table.reset_index(drop=True), paths, classes, source, **kw)


def read_csv_boxes(path: str | os.PathLike[str], classes: list[str] | None = None) -> BoxTable:
    """A CSV/Parquet manifest with ``image_path, x_min, y_min, x_max, y_max, label`` (several rows per image; empty
    box columns mark a negative). Without ``classes`` they are the labels found, in natural order."""
    source = str(path)
    table = read_table(path)
    missing = [c for c in ("image_path", *BOX_COLUMNS, "label") if c not in table.columns]
    if missing:
        raise ManifestError(
            f"manifest {source}: missing column(s) {missing}; it has {list(table.columns)}. "
            "Required: image_path, x_min, y_min, x_max, y_max, label (pixel edges of the image as stored)"
        )
    if len(table) == 0:
        raise ManifestError(f"manifest {source}: has no rows")
    base = Path(source).resolve().parent
    table = table.reset_index(drop=True)
    table["label"] = [_label_name(v) for v in table["label"]]
    table["source"] = [f"{Path(source).name} row {i}" for i in range(len(table))]
    paths = ["" if pd.isna(v) or not str(v).strip() else _resolve(v, base) for v in table["image_path"]]
    boxed = table[list(BOX_COLUMNS)].notna().any(axis=1)
    names = classes or _sorted_names({lab for lab, b in zip(table["label"], boxed) if b and lab is not None})
    return _finish(table, paths, list(names), source)


def _parse_yolo(text: str, txt: str, height: int, width: int, classes: list[str] | None) -> list[dict]:
    """Rows of one YOLO label file; a malformed line raises ValueError naming the file and line."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{Path(txt).name} line {number}"
        if len(fields) != 5:
            raise ConfigError(f"{where}: expected 'label x_center y_center width height', got {line.strip()!r}")
        try:
            label_id = int(fields[0])
            xc, yc, w, h = (float(v) for v in fields[1:])
        except ValueError:
            raise ConfigError(f"{where}: not numbers: {line.strip()!r}") from None
        if label_id < 0 or (classes is not None and label_id >= len(classes)):
            raise ConfigError(f"{where}: class id {label_id} is not in 0..{len(classes or []) - 1} ({classes})")
        if not all(np.isfinite([xc, yc, w, h])) or max(abs(xc), abs(yc), abs(w), abs(h)) > 2:
            raise ConfigError(f"{where}: YOLO coordinates are normalised to [0, 1]; got {line.strip()!r}")
        rows.append(
            {
                "x_min": (xc - w / 2) * width,
                "y_min": (yc - h / 2) * height,
                "x_max": (xc + w / 2) * width,
                "y_max": (yc + h / 2) * height,
                "label": classes[label_id] if classes is not None else str(label_id),
                "source": where,
            }
        )
    return rows


def _image_list(path: str) -> tuple[pd.DataFrame, Path]:
    """Images of a folder (searched recursively) or of a CSV/Parquet list with ``image_path`` (other columns kept)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ManifestError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
        return pd.DataFrame({"image_path": [str(f.relative_to(p)) for f in files]}), p.resolve()
    table = read_table(path)
    if "image_path" not in table.columns:
        raise ManifestError(f"manifest {path}: missing column image_path; it has {list(table.columns)}")
    if len(table) == 0:
        raise ManifestError(f"manifest {path}: has no rows")
    return table.reset_index(drop=True), p.resolve().parent


def read_yolo_boxes(path: str | os.PathLike[str], classes: list[str] | None = None) -> BoxTable:
    """YOLO labels: one ``.txt`` beside each image (lines ``label x_center y_center width height``, normalised; an
    empty file marks a negative). ``path``: a folder of images, or a CSV/Parquet list with ``image_path``.
    ``classes`` names the class ids 0, 1, …; without it the names are the ids."""
    source = str(path)
    images, base = _image_list(source)
    rows: list[dict] = []
    paths: list[str] = []
    errors: dict[int, str] = {}
    shapes: dict[str, tuple[int, int]] = {}
    found: set[str] = set()
    for _, image in images.iterrows():
        carried = image.to_dict()
        value = carried["image_path"]
        resolved = "" if pd.isna(value) or not str(value).strip() else _resolve(value, base)
        txt = str(Path(resolved).with_suffix(".txt")) if resolved else ""
        problem, parsed = None, []
        if resolved and os.path.isfile(resolved):
            try:
                shapes[resolved] = height_width = image_shape(resolved)
                if not os.path.isfile(txt):
                    problem = f"no YOLO label file {txt} beside the image (an empty file marks an image without boxes)"
                else:
                    parsed = _parse_yolo(Path(txt).read_text(), txt, *height_width, classes)
            except ValueError as err:
                problem = str(err)
            except Exception as err:  # an unreadable image header
                problem = f"cannot be read as an image ({str(err).splitlines()[0][:160]})"
        for box in parsed or [{"source": Path(txt).name if txt else "", "label": None}]:
            if problem is not None:
                errors[len(rows)] = problem
            rows.append({**carried, **{c: np.nan for c in BOX_COLUMNS}, **box})
            paths.append(resolved)
        found.update(b["label"] for b in parsed)
    table = pd.DataFrame(rows)
    names = list(classes) if classes is not None else _sorted_names(found)
    return _finish(table, paths, names, source, row_errors=errors, shapes=shapes)


def read_coco_boxes(
    path: str | os.PathLike[str], classes: list[str] | None = None, image_root: str | None = None
) -> BoxTable:
    """A COCO json (``images``, ``annotations`` with ``bbox`` = [x, y, width, height] in pixels, ``categories``).
    Images are found under ``image_root`` (default: the json's folder); an image without annotations is a negative;
    any other key of an image entry (``patient_id``, ``split``) becomes a column. Crowd annotations are left out."""
    source = str(path)
    try:
        data = json.loads(Path(source).read_text())
    except (OSError, ValueError) as err:
        raise ManifestError(f"COCO file {source}: cannot be read ({err})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ManifestError(f"COCO file {source}: no {key!r} list")
    categories = {c["id"]: str(c["name"]) for c in data["categories"]}
    names = list(classes) if classes is not None else [categories[k] for k in sorted(categories)]
    base = Path(image_root) if image_root else Path(source).resolve().parent
    by_image: dict[object, list[dict]] = {}
    crowd = 0
    for number, ann in enumerate(data["annotations"]):
        if ann.get("iscrowd"):
            crowd += 1
            continue
        by_image.setdefault(ann.get("image_id"), []).append({**ann, "_number": number})
    if crowd:
        warnings.warn(f"{source}: {crowd} crowd annotations (iscrowd=1) left out", stacklevel=2)
    rows: list[dict] = []
    paths: list[str] = []
    errors: dict[int, str] = {}
    declared: dict[str, tuple[int, int]] = {}
    known_ids = {img.get("id") for img in data["images"]}
    for img in data["images"]:
        carried = {k: v for k, v in img.items() if k not in ("id", "file_name", "width", "height")}
        resolved = _resolve(img.get("file_name", ""), base) if img.get("file_name") else ""
        try:
            declared[resolved] = (int(img["height"]), int(img["width"]))
        except (KeyError, TypeError, ValueError):
            pass  # COCO requires them, but a file without them still reads: the image itself is checked
        for ann in by_image.get(img.get("id"), []) or [None]:
            row = {"image_path": img.get("file_name", ""), "coco_image_id": img.get("id"), **carried}
            if ann is None:
                row.update({c: np.nan for c in BOX_COLUMNS}, label=None, source=f"COCO image id {img.get('id')}")
            else:
                where = f"COCO annotation id {ann.get('id', ann['_number'])}"
                bbox = ann.get("bbox")
                try:
                    x, y, w, h = (float(v) for v in bbox)
                except (TypeError, ValueError):
                    errors[len(rows)] = f"{where}: bbox must be [x, y, width, height] numbers, got {bbox!r}"
                    x = y = w = h = np.nan
                category = ann.get("category_id")
                if category not in categories:
                    errors[len(rows)] = f"{where}: category_id {category!r} is not among the categories"
                row.update(x_min=x, y_min=y, x_max=x + w, y_max=y + h, label=categories.get(category), source=where)
            rows.append(row)
            paths.append(resolved)
    orphans = sorted(set(by_image) - known_ids, key=str)
    if orphans:
        raise ManifestError(f"COCO file {source}: annotations name image ids not in 'images', e.g. {orphans[:3]}")
    if not rows:
        raise ManifestError(f"COCO file {source}: has no images")
    return _finish(pd.DataFrame(rows), paths, names, source, row_errors=errors, declared=declared)


def read_image_list(path: str | os.PathLike[str]) -> BoxTable:
    """Images without boxes (a folder or a list with ``image_path``): something to predict on, nothing to score."""
    images, base = _image_list(str(path))
    table = images.copy()
    for column in BOX_COLUMNS:
        table[column] = np.nan
    table["label"] = None
    table["source"] = [f"{Path(str(path)).name} row {i}" for i in range(len(table))]
    paths = ["" if pd.isna(v) or not str(v).strip() else _resolve(v, base) for v in table["image_path"]]
    return _finish(table, paths, [], str(path), has_boxes=False)


def detect_format(path: str | os.PathLike[str]) -> str:
    """``coco`` for a .json, ``yolo`` for a folder, ``csv`` for a table with box columns, else ``yolo`` when every
    listed image has a .txt beside it, else ``images`` (a plain list)."""
    p = Path(path)
    if p.suffix.lower() == ".json":
        return "coco"
    if p.is_dir():
        return "yolo"
    table = read_table(p)
    if all(c in table.columns for c in BOX_COLUMNS):
        return "csv"
    if "image_path" in table.columns:
        base = p.resolve().parent
        listed = [_resolve(v, base) for v in table["image_path"].dropna()]
        if listed and all(Path(f).with_suffix(".txt").is_file() for f in listed):
            return "yolo"
    return "images"


def read_boxes(
    path: str | os.PathLike[str],
    format: str = "auto",
    classes: list[str] | None = None,
    image_root: str | None = None,
    tolerance: float = 0.01,
) -> BoxTable:
    """Read and check a box manifest of any format (:func:`detect_format` for ``auto``); bad rows are in
    ``row_errors`` (call ``raise_first()`` to stop at the first)."""
    if format not in FORMATS:
        raise ManifestError(f"format={format!r}; allowed {FORMATS}")
    if not Path(path).exists():
        raise ManifestError(f"manifest {path}: file not found")
    kind = detect_format(path) if format == "auto" else format
    if kind == "csv":
        boxes = read_csv_boxes(path, classes)
    elif kind == "yolo":
        boxes = read_yolo_boxes(path, classes)
    elif kind == "coco":
        boxes = read_coco_boxes(path, classes, image_root)
    else:
        boxes = read_image_list(path)
        if classes:
            boxes.classes = list(classes)
    return check_boxes(boxes, tolerance)
