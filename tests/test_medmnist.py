"""``medfm data medmnist``: a MedMNIST .npz becomes PNG / NIfTI images and a manifest with label and split columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from PIL import Image

from medfm.cli import main
from medfm.data.medmnist import convert_medmnist
from medfm.errors import ManifestError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _read(path: Path) -> np.ndarray:
    if path.name.endswith(".nii.gz"):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return np.asarray(Image.open(path))


def _check(npz: Path, out: Path, n_check: int = 5) -> pd.DataFrame:
    manifest = pd.read_csv(convert_medmnist(npz, out))
    data = np.load(npz)
    for split in ("train", "val", "test"):
        part = manifest[manifest["split"] == split].reset_index(drop=True)
        images, labels = data[f"{split}_images"], data[f"{split}_labels"].reshape(len(part), -1)
        assert len(part) == len(images)
        for i in list(range(min(n_check, len(part)))) + [len(part) - 1]:
            np.testing.assert_array_equal(_read(out / part.loc[i, "image_path"]), images[i])
        if labels.shape[1] == 1:
            np.testing.assert_array_equal(part["label"], labels[:, 0])
    return manifest


def test_a_tiny_npz_of_each_kind(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1)).astype(np.uint8)
    np.savez(tmp_path / "grey.npz", **arrays)
    manifest = _check(tmp_path / "grey.npz", tmp_path / "grey")
    assert list(manifest.columns) == ["image_path", "split", "label"]
    assert manifest["split"].tolist() == ["train"] * 4 + ["val"] * 2 + ["test"] * 3
    assert manifest["image_path"].iloc[4] == "images/val_00000.png"

    rgb = {
        k: (rng.integers(0, 256, (len(v), 28, 28, 3), dtype=np.uint8) if "images" in k else v)
        for k, v in arrays.items()
    }
    rgb |= {
        f"{s}_labels": rng.integers(0, 2, (len(arrays[f"{s}_labels"]), 3)).astype(np.uint8)
        for s in ("train", "val", "test")
    }
    np.savez(tmp_path / "rgb.npz", **rgb)
    manifest = _check(tmp_path / "rgb.npz", tmp_path / "rgb")
    assert [c for c in manifest.columns if c.startswith("label")] == ["label_0", "label_1", "label_2"]  # multi-label
    np.testing.assert_array_equal(manifest[["label_0", "label_1", "label_2"]].iloc[:4], rgb["train_labels"])

    vol = {
        k: (rng.integers(0, 256, (len(v), 8, 9, 10), dtype=np.uint8) if "images" in k else v) for k, v in arrays.items()
    }
    np.savez(tmp_path / "vol3d.npz", **vol)
    manifest = _check(tmp_path / "vol3d.npz", tmp_path / "vol")
    assert manifest["image_path"].str.endswith(".nii.gz").all()

    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 4, 4)))
    with pytest.raises(ManifestError, match="no train_images/val_images/test_images arrays"):
        convert_medmnist(tmp_path / "bad.npz", tmp_path / "bad")


@pytest.mark.parametrize(
    "relative", ["pneumoniamnist/pneumoniamnist_reconstructed.npz", "adrenalmnist3d/adrenalmnist3d.npz"]
)
def test_real_medmnist_files(relative, tmp_path, capsys):
    npz = SHARED / relative
    if not npz.is_file():
        pytest.skip(f"{npz} not present")
    out = tmp_path / "out"
    assert main(["data", "medmnist", str(npz), "--out", str(out)]) == 0
    data = np.load(npz)
    sizes = {s: len(data[f"{s}_labels"]) for s in ("train", "val", "test")}
    assert f"(train {sizes['train']}, val {sizes['val']}, test {sizes['test']})" in capsys.readouterr().out
    manifest = _check(npz, tmp_path / "again", n_check=3)
    assert manifest["split"].value_counts().to_dict() == sizes
    assert manifest["image_path"].iloc[0].endswith(".nii.gz" if "3d" in relative else ".png")
