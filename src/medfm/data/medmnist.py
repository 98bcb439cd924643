"""MedMNIST ``.npz`` files as medfm inputs: one image file per array (PNG for 2D sets, NIfTI for 3D) and a manifest.

A MedMNIST file holds ``train_images``, ``train_labels``, ``val_images``, ... (images ``(N, H, W)``, ``(N, H, W, 3)``
or, for the 3D sets, ``(N, D, H, W)``; labels ``(N,)`` or ``(N, K)``). :func:`convert_medmnist` writes
``images/{split}_{i:05d}.png|.nii.gz`` and ``manifest.csv`` with ``image_path`` (relative to the manifest), ``label``
(``label_0 ... label_{K-1}`` for multi-label sets) and ``split`` (train / val / test, from the keys).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from medfm.data.outputs import atomic_path, write_table
from medfm.errors import ManifestError

SPLITS = ("train", "val", "test")


def convert_medmnist(npz: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write a MedMNIST ``.npz`` as image files and ``out/manifest.csv``; returns the manifest's path."""
    npz, out = Path(npz), Path(out)
    try:
        data = np.load(npz, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ManifestError(f"{npz}: not a readable .npz file ({err})") from None
    present = [s for s in SPLITS if f"{s}_images" in data.files]
    if not present:
        raise ManifestError(f"{npz}: no train_images/val_images/test_images arrays (it has {data.files})")
    rows = []
    (out / "images").mkdir(parents=True, exist_ok=True)
    for split in present:
        if f"{split}_labels" not in data.files:
            raise ManifestError(f"{npz}: {split}_images has no {split}_labels")
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        if len(images) != len(labels):
            raise ManifestError(f"{npz}: {len(images)} {split} images but {len(labels)} labels")
        volumes = images.ndim == 4 and images.shape[-1] != 3
        if images.ndim not in (3, 4):
            raise ManifestError(
                f"{npz}: {split}_images has shape {images.shape}; expected (N, H, W[, 3]) or (N, D, H, W)"
            )
        labels = labels.reshape(len(labels), -1)
        for i, (image, label) in enumerate(zip(images, labels)):
            name = f"images/{split}_{i:05d}.{'nii.gz' if volumes else 'png'}"
            _write_image(image, out / name, volumes)
            row = {"image_path": name, "split": split}
            row |= (
                {"label": int(label[0])}
                if labels.shape[1] == 1
                else {f"label_{k}": int(v) for k, v in enumerate(label)}
            )
            rows.append(row)
    return write_table(pd.DataFrame(rows), out / "manifest.csv")


def _write_image(image: np.ndarray, dest: Path, volume: bool) -> None:
    with atomic_path(dest) as tmp:
        if volume:
            import SimpleITK as sitk

            written = tmp.with_name(tmp.name + ".nii.gz")  # ITK chooses the format by the name
            sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(image)), str(written))
            os.replace(written, tmp)
        else:
            from PIL import Image

            Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")
