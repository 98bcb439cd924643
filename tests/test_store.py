"""The patch store: exact patches with a margin, mined negatives, reuse by key, resume after a crash, bad rows, 2D."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import medfm.data.store as store_module
from medfm.data.images2d import preprocess2d, read_image2d
from medfm.data.io import Geometry, Volume, read_volume
from medfm.data.manifest import read_manifest
from medfm.data.patches import crop_patch
from medfm.data.profiles import FMCIB_CENTRED, get_profile
from medfm.data.store import (
    BODY_HU,
    _far_seeds,
    build_store,
    enlarged,
    open_store,
    store_from_arrays,
    store_key,
)
from medfm.data.synthetic import make_demo_dataset
from medfm.errors import RowError

# "centred" keeps the seed at the same voxel of the 1 mm grid and starts the patch at centre - size//2 without any
# clamping, so the enlarged (size + 2·margin) patch starts exactly `margin` grid voxels before the plain one: its
# centre block is sampled at the very same points. With "clamp-pad" a patch near a border is clamped and re-padded
# symmetrically, which shifts the two crops differently; "centred" makes the comparison exact everywhere.
SMALL = replace(FMCIB_CENTRED, name="test-centred-16", size=(16, 16, 16))
MARGIN = 2
BIG = 16 + 2 * MARGIN


def _cut_calls(monkeypatch, fail_on: int | None = None, error: type[BaseException] = KeyboardInterrupt) -> list[str]:
    """Wrap ``_cut_volume``: record the path of each call, raise ``error`` on call number ``fail_on`` (1-based)."""
    real = store_module._cut_volume
    calls: list[str] = []

    def wrapper(manifest, path, *args, **kwargs):
        calls.append(path)
        if fail_on is not None and len(calls) == fail_on:
            raise error(f"stopped while cutting {path}")
        return real(manifest, path, *args, **kwargs)

    monkeypatch.setattr(store_module, "_cut_volume", wrapper)
    return calls


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Two synthetic patients with four lesions each: the manifest path, the manifest and the volumes."""
    folder = tmp_path_factory.mktemp("demo")
    path = make_demo_dataset(folder, n_patients=2)
    manifest = read_manifest(path)
    volumes = {p: read_volume(p) for p in dict.fromkeys(manifest.paths)}
    return path, manifest, volumes


@pytest.fixture(scope="module")
def built(demo, tmp_path_factory):
    """The demo store with margin 2 and two mined negatives per row (built once for the module)."""
    _, manifest, _ = demo
    root = tmp_path_factory.mktemp("stores")
    return build_store(manifest, SMALL, root, margin=MARGIN, negatives=2, seed=3, progress=False)


# ---------------------------------------------------------------------------------------------- 3D patches


def test_store_holds_enlarged_patches_whose_centre_is_the_plain_crop(demo, built):
    _, manifest, volumes = demo
    assert len(manifest) == 8 and manifest.row_errors == {}
    assert built.patches.shape == (8, 1, BIG, BIG, BIG)
    assert built.patches.dtype == np.float32
    assert built.size == (BIG, BIG, BIG) and built.dims == 3 and len(built) == 8
    assert built.margin == MARGIN
    assert built.profile == json.loads(json.dumps(enlarged(SMALL, MARGIN).to_dict()))  # tuples come back as lists
    np.testing.assert_array_equal(built.rows, np.arange(8))
    np.testing.assert_array_equal(np.load(built.root / "rows.npy"), np.arange(8))
    inner = (slice(None), slice(MARGIN, MARGIN + 16), slice(MARGIN, MARGIN + 16), slice(MARGIN, MARGIN + 16))
    # Same sample points, so equal (bit for bit here); 1e-6 only leaves room for BLAS summation order in the
    # separable interpolation, while a one-voxel shift would differ by ~1e-2.
    for i, row in enumerate(built.rows):
        expected = crop_patch(volumes[manifest.paths[row]], manifest.seeds_lps[row], SMALL)
        assert expected.shape == (1, 16, 16, 16)
        np.testing.assert_allclose(built.patches[i][inner], expected, rtol=0, atol=1e-6)
        # and the whole stored patch is the crop of the enlarged profile
        big = crop_patch(volumes[manifest.paths[row]], manifest.seeds_lps[row], enlarged(SMALL, MARGIN))
        np.testing.assert_allclose(built.patches[i], big, rtol=0, atol=1e-6)
    assert len({built.patches[i].tobytes() for i in range(8)}) == 8  # every lesion gives its own patch
    # lung (-850 HU) and soft tissue (40 HU) are in there, scaled by the HU window: (HU + 1024) / 3072
    assert float(np.min(built.patches)) < (-800 + 1024) / 3072 < (0 + 1024) / 3072 < float(np.max(built.patches))


def test_store_opens_again_read_only(built):
    again = open_store(built.root)
    np.testing.assert_array_equal(again.patches, built.patches)
    np.testing.assert_array_equal(again.negatives, built.negatives)
    assert not again.patches.flags.writeable
    meta = json.loads((built.root / "store.json").read_text())
    assert meta["margin"] == MARGIN and meta["negatives"] == 2 and meta["seed"] == 3
    assert json.loads((built.root / "errors.json").read_text()) == {}
    assert not Path(f"{built.root}.partial").exists()


def test_open_store_refuses_a_folder_without_store_json(tmp_path):
    from medfm.errors import MedfmError

    with pytest.raises(MedfmError, match="not a finished patch store"):
        open_store(tmp_path)


# ---------------------------------------------------------------------------------------------- mined negatives


def test_mined_negatives_shape_and_differ_from_their_positive(built):
    negs = built.negatives
    assert negs is not None and negs.shape == (8, 2, 1, BIG, BIG, BIG) and negs.dtype == np.float32
    for i in range(len(built)):
        for k in range(2):
            assert np.max(np.abs(negs[i, k] - built.patches[i])) > 0.01
        assert not np.array_equal(negs[i, 0], negs[i, 1])
    # a negative's centre lies inside the body (denser than BODY_HU), so its centre voxel is not air
    centre = BIG // 2
    assert np.all(negs[:, :, 0, centre, centre, centre] > (BODY_HU - 100 + 1024) / 3072)


def test_mined_negatives_are_seeded(demo, built, tmp_path):
    _, manifest, _ = demo
    rows = [0, 1, 2, 3]  # the first patient only: quick
    a = build_store(manifest, SMALL, tmp_path / "a", margin=MARGIN, negatives=2, seed=3, rows=rows, progress=False)
    b = build_store(manifest, SMALL, tmp_path / "b", margin=MARGIN, negatives=2, seed=4, rows=rows, progress=False)
    np.testing.assert_array_equal(a.negatives, built.negatives[:4])  # row-seeded: same with fewer rows
    np.testing.assert_array_equal(a.patches, b.patches)
    assert not np.array_equal(a.negatives, b.negatives)


def _body_volume() -> Volume:
    """40×30×20 voxels (x, y, z) of air (-1000 HU) with a box of body (0 HU), anisotropic spacing, odd origin."""
    array = np.full((20, 30, 40), -1000, dtype=np.int16)  # (Z, Y, X)
    array[3:17, 5:25, 6:34] = 0
    geometry = Geometry(
        size=(40, 30, 20), spacing=(1.0, 1.5, 2.5), origin=(-20.0, 7.5, -30.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)
    )
    return Volume(array=array, geometry=geometry, path="<body>")


def test_far_seeds_inside_the_body_and_away_from_every_seed():
    volume = _body_volume()
    seeds = volume.geometry.index_to_world(np.array([[12.0, 10.0, 6.0], [26.0, 18.0, 12.0]]))
    points = _far_seeds(volume, seeds, count=12, min_mm=10.0, rng=np.random.default_rng(7))
    assert len(points) == 12
    for point in points:
        assert point.shape == (3,)
        assert np.min(np.linalg.norm(seeds - point, axis=1)) >= 10.0
        x, y, z = np.round(volume.geometry.world_to_index(point)).astype(int)
        assert volume.array[z, y, x] > BODY_HU  # inside the body box
        assert 6 <= x < 34 and 5 <= y < 25 and 3 <= z < 17
    assert len({tuple(np.round(p, 6)) for p in points}) == 12
    again = _far_seeds(volume, seeds, count=12, min_mm=10.0, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(np.array(points), np.array(again))
    other = _far_seeds(volume, seeds, count=12, min_mm=10.0, rng=np.random.default_rng(8))
    assert not np.array_equal(np.array(points), np.array(other))


def test_far_seeds_falls_back_to_the_farthest_body_points_when_none_is_far_enough():
    volume = _body_volume()
    seeds = volume.geometry.index_to_world(np.array([[20.0, 15.0, 10.0]]))
    points = _far_seeds(volume, seeds, count=3, min_mm=1000.0, rng=np.random.default_rng(0))
    assert len(points) == 3
    for point in points:
        x, y, z = np.round(volume.geometry.world_to_index(point)).astype(int)
        assert volume.array[z, y, x] > BODY_HU  # body points come before air points in the fallback
        assert np.linalg.norm(seeds[0] - point) > 15.0  # and the farthest of them


# ---------------------------------------------------------------------------------------------- reuse by key


def test_same_inputs_reuse_the_store_without_cutting(demo, built, monkeypatch):
    _, manifest, _ = demo
    calls = _cut_calls(monkeypatch, fail_on=1, error=AssertionError)
    again = build_store(manifest, SMALL, built.root.parent, margin=MARGIN, negatives=2, seed=3, progress=False)
    assert calls == []
    assert again.root == built.root
    assert again.root.name == store_key(manifest, list(range(8)), SMALL, MARGIN, 2, 3)
    np.testing.assert_array_equal(again.patches, built.patches)


def test_key_changes_with_what_shapes_the_content(demo):
    _, manifest, _ = demo
    rows = list(range(8))
    key = store_key(manifest, rows, SMALL, MARGIN, 2, 3)
    assert key == store_key(manifest, rows, SMALL, MARGIN, 2, 3)
    assert len(key) == 16
    changed = [
        store_key(manifest, rows, replace(SMALL, size=(18, 18, 18)), MARGIN, 2, 3),  # profile size
        store_key(manifest, rows, replace(SMALL, hu_window=(-1000.0, 1000.0)), MARGIN, 2, 3),  # scaling
        store_key(manifest, rows, SMALL, MARGIN + 1, 2, 3),  # margin
        store_key(manifest, rows, SMALL, MARGIN, 3, 3),  # negatives
        store_key(manifest, rows, SMALL, MARGIN, 2, 4),  # seed
        store_key(manifest, rows[:-1], SMALL, MARGIN, 2, 3),  # rows
    ]
    assert len({key, *changed}) == 1 + len(changed)


def test_changed_margin_builds_a_new_folder(demo, built, monkeypatch):
    _, manifest, _ = demo
    real, volumes = store_module.iter_volume_items, []

    def counting(*args, **kwargs):  # without negatives the store reads through the extraction path
        for item in real(*args, **kwargs):
            volumes.append(item.rows)
            yield item

    monkeypatch.setattr(store_module, "iter_volume_items", counting)
    other = build_store(manifest, SMALL, built.root.parent, margin=MARGIN + 1, negatives=0, seed=3, progress=False)
    assert len(volumes) == 2 and sum(map(len, volumes)) == 8  # both volumes cut again, every row
    assert other.root != built.root and other.root.parent == built.root.parent
    assert other.patches.shape == (8, 1, BIG + 2, BIG + 2, BIG + 2) and other.negatives is None
    np.testing.assert_allclose(other.patches[:, :, 1:-1, 1:-1, 1:-1], built.patches, rtol=0, atol=1e-6)
    assert open_store(built.root).patches.shape == (8, 1, BIG, BIG, BIG)  # the first store is left alone


# ---------------------------------------------------------------------------------------------- resume


def test_a_stopped_build_resumes_without_recutting_and_matches_one_go(demo, built, tmp_path, monkeypatch):
    _, manifest, _ = demo
    first, second = list(dict.fromkeys(manifest.paths))
    calls = _cut_calls(monkeypatch, fail_on=2)
    with pytest.raises(KeyboardInterrupt):
        build_store(manifest, SMALL, tmp_path, margin=MARGIN, negatives=2, seed=3, progress=False)
    assert calls == [first, second]
    key = store_key(manifest, list(range(8)), SMALL, MARGIN, 2, 3)
    assert (tmp_path / f"{key}.partial").is_dir() and not (tmp_path / key).exists()
    np.testing.assert_array_equal(np.load(tmp_path / f"{key}.partial" / "done.npy"), [True] * 4 + [False] * 4)

    calls = _cut_calls(monkeypatch)
    resumed = build_store(manifest, SMALL, tmp_path, margin=MARGIN, negatives=2, seed=3, progress=False)
    assert calls == [second]  # the first volume is not cut again
    assert resumed.root == tmp_path / key and not (tmp_path / f"{key}.partial").exists()
    np.testing.assert_array_equal(resumed.rows, built.rows)
    np.testing.assert_array_equal(resumed.patches, built.patches)
    np.testing.assert_array_equal(resumed.negatives, built.negatives)


# ---------------------------------------------------------------------------------------------- bad rows


def _manifest_with_bad_rows(demo, folder: Path, vanishing: bool = False):
    """The demo manifest with row 5's image missing; with ``vanishing`` row 1 reads a copy deleted after reading."""
    path, _, _ = demo
    table = pd.read_csv(path)
    table["image_path"] = [str(path.parent / p) for p in table["image_path"]]
    table.loc[5, "image_path"] = str(folder / "gone.nii.gz")
    if vanishing:
        copy = folder / "copy.nii.gz"
        copy.write_bytes(Path(table.loc[1, "image_path"]).read_bytes())
        table.loc[1, "image_path"] = str(copy)
    bad = folder / "bad.csv"
    table.to_csv(bad, index=False)
    manifest = read_manifest(bad)
    if vanishing:
        copy.unlink()  # the manifest saw it; the build does not
    return manifest


def test_missing_image_raises_a_row_error_naming_the_row(demo, tmp_path):
    manifest = _manifest_with_bad_rows(demo, tmp_path)
    assert manifest.row_errors == {5: "file not found"}
    with pytest.raises(RowError, match=r"row 5 \(image_path=.*gone\.nii\.gz\): file not found") as info:
        build_store(manifest, SMALL, tmp_path / "stores", margin=MARGIN, progress=False)
    assert info.value.row == 5


def test_missing_image_skipped_keeps_the_others_and_lists_the_row(demo, built, tmp_path):
    manifest = _manifest_with_bad_rows(demo, tmp_path)
    store = build_store(manifest, SMALL, tmp_path / "stores", margin=MARGIN, on_error="skip", progress=False)
    keep = [0, 1, 2, 3, 4, 6, 7]
    np.testing.assert_array_equal(store.rows, keep)
    np.testing.assert_array_equal(store.patches, built.patches[keep])
    assert json.loads((store.root / "errors.json").read_text()) == {"5": "file not found"}


def test_image_vanishing_during_the_build_is_a_row_error_too(demo, built, tmp_path):
    manifest = _manifest_with_bad_rows(demo, tmp_path, vanishing=True)
    assert manifest.row_errors == {5: "file not found"}
    with pytest.raises(RowError, match=r"row 1 \(image_path=.*copy\.nii\.gz\)") as info:
        build_store(manifest, SMALL, tmp_path / "stores", margin=MARGIN, rows=[0, 1, 2, 3], progress=False)
    assert info.value.row == 1
    store = build_store(manifest, SMALL, tmp_path / "skip", margin=MARGIN, on_error="skip", progress=False)
    keep = [0, 2, 3, 4, 6, 7]  # row 1 read the vanished copy, row 5 never existed
    np.testing.assert_array_equal(store.rows, keep)
    np.testing.assert_array_equal(store.patches, built.patches[keep])
    errors = json.loads((store.root / "errors.json").read_text())
    assert set(errors) == {"1", "5"} and errors["5"] == "file not found" and errors["1"]


def test_on_error_must_be_raise_or_skip(demo, tmp_path):
    _, manifest, _ = demo
    with pytest.raises(ValueError, match="on_error"):
        build_store(manifest, SMALL, tmp_path, on_error="ignore", progress=False)


# ---------------------------------------------------------------------------------------------- 2D images


@pytest.fixture
def png_manifest(tmp_path):
    """Three 8-bit grey PNGs of different sizes and a manifest of whole images (no seeds)."""
    tmp_path = tmp_path / "png"
    tmp_path.mkdir()
    rng = np.random.default_rng(11)
    names = []
    for i, (h, w) in enumerate([(50, 60), (64, 48), (33, 41)]):
        name = f"image_{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(h, w), dtype=np.uint8), mode="L").save(tmp_path / name)
        names.append(name)
    path = tmp_path / "images.csv"
    pd.DataFrame({"image_path": names}).to_csv(path, index=False)
    return read_manifest(path, seeds=False)


def test_2d_store_of_png_images(png_manifest, tmp_path):
    profile = replace(get_profile("gray-224"), name="gray-32", size=(32, 32))
    store = build_store(png_manifest, profile, tmp_path / "stores", margin=4, progress=False)
    assert store.patches.shape == (3, 1, 40, 40) and store.dims == 2 and store.size == (40, 40)
    assert store.negatives is None
    np.testing.assert_array_equal(store.rows, [0, 1, 2])
    for i in range(3):
        expected = preprocess2d(read_image2d(png_manifest.paths[i]), enlarged(profile, 4))
        np.testing.assert_array_equal(store.patches[i], expected)
    assert len({store.patches[i].tobytes() for i in range(3)}) == 3
    assert 0.0 <= float(np.min(store.patches)) and float(np.max(store.patches)) <= 1.0


def test_2d_store_refuses_mined_negatives(png_manifest, tmp_path):
    profile = replace(get_profile("gray-224"), name="gray-32", size=(32, 32))
    with pytest.raises(ValueError, match="3D"):
        build_store(png_manifest, profile, tmp_path / "stores", margin=4, negatives=1, progress=False)
    assert not (tmp_path / "stores").exists()


# ---------------------------------------------------------------------------------------------- from arrays


def _images(n: int = 4, shape=(28, 28, 28), seed: int = 0) -> np.ndarray:
    """Random 8-bit volumes scaled to [0, 1], as MedMNIST 3D gives them."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8) / 255.0


def test_store_from_arrays_centre_block_labels_and_splits(tmp_path):
    images = _images()
    labels = np.array([[0], [2], [1], [2]])
    splits = np.array(["train", "val", "train", "val"])
    store = store_from_arrays(images, tmp_path / "s", (20, 20, 20), margin=2, labels=labels, splits=splits)
    assert store.patches.shape == (4, 1, 24, 24, 24) and store.patches.dtype == np.float32
    np.testing.assert_array_equal(store.patches, images[:, None, 2:26, 2:26, 2:26].astype(np.float32))
    np.testing.assert_array_equal(store.rows, np.arange(4))
    assert store.negatives is None and store.margin == 2 and store.profile is None
    np.testing.assert_array_equal(store.labels, [0, 2, 1, 2])
    np.testing.assert_array_equal(store.splits, splits)
    np.testing.assert_array_equal(store.indices("val"), [1, 3])
    np.testing.assert_array_equal(store.indices("train"), [0, 2])
    np.testing.assert_array_equal(store.indices(None), np.arange(4))
    assert store.indices("test").size == 0
    again = open_store(tmp_path / "s")
    np.testing.assert_array_equal(again.labels, store.labels)
    np.testing.assert_array_equal(again.splits, splits)


def test_store_from_arrays_negatives_are_other_blocks_of_the_same_image(tmp_path):
    images = _images(n=3).astype(np.float32)
    store = store_from_arrays(images, tmp_path, (20, 20, 20), margin=2, negatives=3, seed=5)
    assert store.negatives.shape == (3, 3, 1, 24, 24, 24)
    for i in range(3):
        for k in range(3):
            neg = store.negatives[i, k, 0]
            assert not np.array_equal(neg, store.patches[i, 0])
            corners = [
                c
                for c in np.ndindex(5, 5, 5)
                if np.array_equal(neg, images[i, c[0] : c[0] + 24, c[1] : c[1] + 24, c[2] : c[2] + 24])
            ]
            assert len(corners) == 1 and corners[0] != (2, 2, 2)
    again = store_from_arrays(images, tmp_path, (20, 20, 20), margin=2, negatives=3, seed=5)
    np.testing.assert_array_equal(again.negatives, store.negatives)


def test_store_from_arrays_negatives_differ_even_with_little_room(tmp_path):
    # one spare voxel on each side of x only: the centre corner is one of three, and half a patch away is impossible
    images = _images(n=6, shape=(20, 20, 22)).astype(np.float32)
    store = store_from_arrays(images, tmp_path, (20, 20, 20), negatives=4, seed=0)
    np.testing.assert_array_equal(store.patches[:, 0], images[:, :, :, 1:21])
    for i in range(6):
        for k in range(4):
            assert not np.array_equal(store.negatives[i, k], store.patches[i])


def test_store_from_arrays_channels_2d_and_bad_sizes(tmp_path):
    images = np.random.default_rng(1).random((2, 3, 30, 34), dtype=np.float32)  # (N, C, H, W)
    store = store_from_arrays(images, tmp_path / "2d", (20, 20), margin=3)
    assert store.patches.shape == (2, 3, 26, 26) and store.dims == 2
    np.testing.assert_array_equal(store.patches, images[:, :, 2:28, 4:30])
    with pytest.raises(ValueError, match="larger than the images"):
        store_from_arrays(_images(n=2), tmp_path / "big", (28, 28, 28), margin=1)
    with pytest.raises(ValueError, match="larger than the images"):
        store_from_arrays(_images(n=2), tmp_path / "big", (30, 20, 20))
    with pytest.raises(ValueError, match="do not match"):
        store_from_arrays(np.zeros((2, 1, 1, 28, 28)), tmp_path / "dims", (20, 20))
