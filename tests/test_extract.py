"""``extract_features``: values, row order, provenance, bad rows, resume, weights and precision."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import medfm
from medfm.data.io import read_volume
from medfm.data.manifest import Manifest, read_manifest
from medfm.data.outputs import sidecar_path
from medfm.data.patches import crop_patch
from medfm.data.profiles import get_profile
from medfm.data.synthetic import make_demo_dataset
from medfm.errors import ConfigError, MedfmError, OutputError, RowError, WeightsError
from medfm.features.extract import FeatureRunner, extract_features
from medfm.models import load_model

MODEL = "resnet10-3d"
DIM = 512
FEATS = [f"feat_{i}" for i in range(DIM)]


@dataclass
class Demo:
    folder: Path
    manifest_path: Path
    manifest: Manifest


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Demo:
    folder = tmp_path_factory.mktemp("extract_demo")
    path = make_demo_dataset(folder, n_patients=2)
    manifest = read_manifest(path)
    assert len(manifest) == 8 and manifest.row_errors == {}
    return Demo(folder, path, manifest)


@pytest.fixture(scope="module")
def reference(demo) -> np.ndarray:
    """Features computed directly: seed-0 resnet10-3d in eval mode on ``crop_patch`` of every row."""
    profile = get_profile("fmcib")
    patches = [
        crop_patch(read_volume(demo.manifest.paths[row]), demo.manifest.seeds_lps[row], profile)
        for row in range(len(demo.manifest))
    ]
    model = load_model(MODEL, None, seed=0).model.eval()
    with torch.inference_mode():
        return model(torch.from_numpy(np.stack(patches))).numpy()


def run(manifest: Manifest, out: Path, **kwargs):
    options = {
        "model": MODEL,
        "random_init": True,
        "num_workers": 0,
        "progress": False,
        "batch_size": 3,
        "device": "cpu",
    }
    options.update(kwargs)
    return extract_features(manifest, out, **options)


@pytest.fixture(scope="module")
def base(demo, tmp_path_factory):
    """One uninterrupted Parquet run; returns (result, table)."""
    out = tmp_path_factory.mktemp("extract_base") / "f.parquet"
    result = run(demo.manifest, out)
    return result, pd.read_parquet(out)


def partial_rows(partial: Path) -> tuple[list[int], list[str], np.ndarray]:
    """Rows, resolved paths and features kept in an ``NAME.partial`` folder, in the order they were written."""
    rows, paths, feats = [], [], []
    for file in sorted(partial.glob("part-*.npz")):
        with np.load(file) as part:
            rows += part["rows"].tolist()
            paths += part["paths"].tolist()
            feats.append(part["features"])
    return rows, paths, (np.concatenate(feats) if feats else np.zeros((0, DIM), np.float32))


@pytest.fixture(scope="module")
def half(demo) -> Manifest:
    """The first patient only (the demo's rows 0..3): for the runs that need not cover all eight rows."""
    table = pd.read_csv(demo.manifest_path)
    return write_manifest(demo, table[table["patient_id"] == "P000"], "half.csv")


def write_manifest(demo: Demo, table: pd.DataFrame, name: str) -> Manifest:
    """Write a changed manifest beside the demo one (so relative image paths still resolve) and read it."""
    path = demo.folder / name
    table.to_csv(path, index=False)
    return read_manifest(path)


def test_output_columns_and_row_order(demo, base):
    result, table = base
    manifest_cols = list(demo.manifest.table.columns)
    assert list(table.columns) == manifest_cols + FEATS
    pd.testing.assert_frame_equal(table[manifest_cols], demo.manifest.table, check_dtype=False)
    assert result.n_rows == 8 and result.errors == {} and result.errors_file is None
    assert result.features.is_file()
    assert not result.features.with_name("f.partial").exists()
    assert not result.features.with_name("f.errors.csv").exists()


def test_features_equal_model_on_crop_patch(base, reference):
    _, table = base
    features = table[FEATS].to_numpy()
    assert features.dtype == np.float32
    assert reference.shape == (8, DIM)
    np.testing.assert_allclose(features, reference, atol=1e-5, rtol=0)
    assert np.abs(reference).max() > 1e-2  # the features are not trivially zero
    assert not np.allclose(reference[0], reference[1], atol=1e-4)  # and differ between lesions


def test_sidecar(demo, base):
    result, _ = base
    assert result.sidecar == sidecar_path(result.features) == result.features.with_name("f.json")
    side = json.loads(result.sidecar.read_text())
    assert side["model"] == MODEL
    assert side["random_init"] is True
    assert side["random_init_seed"] == 0
    assert side["weights"] is None and side["weights_sha256"] is None
    assert side["profile"]["name"] == "fmcib"
    assert side["profile"] == get_profile("fmcib").to_dict() | {
        "spacing": [1.0, 1.0, 1.0],
        "size": [50, 50, 50],
        "hu_window": [-1024.0, 2048.0],
    }
    assert side["medfm_version"] == medfm.__version__
    assert side["n_rows"] == 8 and side["n_errors"] == 0 and side["errors_file"] is None
    assert side["feature_dim"] == DIM
    assert side["column_prefix"] == "feat_"
    assert side["precision"] == "32" and side["device"] == "cpu"
    assert side["manifest"] == str(demo.manifest_path) and side["coords"] == "lps"


def test_csv_output_with_pred_prefix(half, base, tmp_path):
    _, table = base
    out = tmp_path / "features.csv"
    result = run(half, out, column_prefix="pred_")
    assert result.features == out and result.n_rows == 4
    got = pd.read_csv(out)
    pred = [f"pred_{i}" for i in range(DIM)]
    assert list(got.columns) == list(half.table.columns) + pred
    assert got["lesion_type"].tolist() == half.table["lesion_type"].tolist()
    np.testing.assert_allclose(got[pred].to_numpy(), table[FEATS].to_numpy()[:4], atol=1e-6)
    side = json.loads((tmp_path / "features.json").read_text())
    assert side["column_prefix"] == "pred_"


def test_worker_process_gives_same_numbers(demo, base, tmp_path):
    _, table = base
    out = tmp_path / "w1.parquet"
    run(demo.manifest, out, num_workers=1)
    got = pd.read_parquet(out)
    pd.testing.assert_frame_equal(got, table)


def test_weights_from_path(half, base, tmp_path):
    _, table = base
    trained = load_model(MODEL, None, seed=0).model
    path = tmp_path / "model_weights.torch"
    torch.save({"trunk_state_dict": trained.state_dict(), "head_state_dict": {"0.weight": torch.ones(1, DIM)}}, path)
    out = tmp_path / "fw.parquet"
    # seed=7 initialises differently; matching the seed-0 features shows the file's weights were used.
    result = run(half, out, weights=path, random_init=False, seed=7)
    side = json.loads(result.sidecar.read_text())
    assert side["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert side["weights"] == str(path)
    assert side["random_init"] is False and side["random_init_seed"] is None
    assert side["load_report"]["coverage"] == 1.0
    assert side["load_report"]["unused"] == [] and side["load_report"]["mismatched"] == []
    np.testing.assert_allclose(pd.read_parquet(out)[FEATS].to_numpy(), table[FEATS].to_numpy()[:4], atol=1e-6)


def test_weights_and_random_init_together_refused(demo, tmp_path):
    with pytest.raises(MedfmError, match="not both"):
        run(demo.manifest, tmp_path / "x.parquet", weights=tmp_path / "w.pt", random_init=True)


@pytest.fixture(scope="module")
def bad_manifest(demo) -> Manifest:
    table = pd.read_csv(demo.manifest_path)
    table.loc[1, "coordX"] = np.nan
    table.loc[3, "image_path"] = "images/missing.nii.gz"
    table.loc[6, "coordX"] += 5000.0
    return write_manifest(demo, table, "bad.csv")


def test_bad_rows_skipped(demo, bad_manifest, base, tmp_path):
    _, good = base
    out = tmp_path / "f.parquet"
    result = run(bad_manifest, out, on_error="skip")
    table = pd.read_parquet(out)
    assert result.n_rows == 5 and len(table) == 5
    keep = [0, 2, 4, 5, 7]
    assert table["lesion_type"].tolist() == demo.manifest.table["lesion_type"].iloc[keep].tolist()
    assert table["coordZ"].tolist() == demo.manifest.table["coordZ"].iloc[keep].tolist()
    np.testing.assert_allclose(table[FEATS].to_numpy(), good[FEATS].to_numpy()[keep], atol=1e-5)

    assert result.errors_file == tmp_path / "f.errors.csv"
    errors = pd.read_csv(result.errors_file)
    assert list(errors.columns) == ["row", *bad_manifest.table.columns, "reason"]
    assert errors["row"].tolist() == [1, 3, 6]
    assert errors["image_path"].tolist() == [
        "images/patient_000.nii.gz",
        "images/missing.nii.gz",
        "images/patient_001.nii.gz",
    ]
    assert errors["lesion_type"].tolist() == bad_manifest.table["lesion_type"].iloc[[1, 3, 6]].tolist()
    assert np.isnan(errors["coordX"].iloc[0])
    reasons = errors["reason"].tolist()
    assert "coordX" in reasons[0] and "not a finite number" in reasons[0]
    assert reasons[1] == "file not found"
    assert "outside the volume" in reasons[2]
    assert result.errors == dict(zip([1, 3, 6], reasons))
    side = json.loads(result.sidecar.read_text())
    assert side["n_rows"] == 5 and side["n_errors"] == 3 and side["errors_file"] == str(result.errors_file)


def test_bad_rows_raise(bad_manifest, tmp_path):
    out = tmp_path / "f.parquet"
    with pytest.raises(RowError) as info:
        run(bad_manifest, out)
    assert info.value.row == 1
    assert "coordX" in info.value.reason
    assert not out.exists()


def test_row_outside_volume_raises_and_keeps_finished_rows(demo, base, tmp_path):
    _, good = base
    table = pd.read_csv(demo.manifest_path)
    table.loc[6, "coordX"] += 5000.0
    manifest = write_manifest(demo, table, "outside.csv")
    out = tmp_path / "f.parquet"
    with pytest.raises(RowError, match="outside the volume") as info:
        run(manifest, out)
    assert info.value.row == 6
    assert info.value.image_path == manifest.paths[6]
    assert not out.exists()
    rows, paths, feats = partial_rows(tmp_path / "f.partial")
    assert rows == [0, 1, 2]  # the first batch of volume 0 ran before volume 1 failed, and is kept
    assert paths == manifest.paths[:3]
    np.testing.assert_allclose(feats, good[FEATS].to_numpy()[:3], atol=1e-5)


def seed_outside(path: str, seed: np.ndarray, mm: float) -> np.ndarray:
    """The LPS seed moved to ``mm`` millimetres beyond the volume's low x face (its y and z kept)."""
    geometry = read_volume(path).geometry
    index = geometry.world_to_index(np.asarray(seed, dtype=float))
    index[0] = -0.5 - mm / geometry.spacing[0]
    return geometry.index_to_world(index)


def test_seed_just_outside_gives_fmcibs_padded_patch_with_a_warning(demo, half, tmp_path):
    table = pd.read_csv(demo.manifest_path).iloc[:4].copy()
    moved = seed_outside(half.paths[2], half.seeds_lps[2], 5.0)
    table.loc[2, ["coordX", "coordY", "coordZ"]] = moved
    manifest = write_manifest(demo, table, "border.csv")
    out = tmp_path / "f.parquet"
    result = run(manifest, out)
    features = pd.read_parquet(out)
    assert list(features.columns) == list(table.columns) + ["warnings"] + FEATS
    assert features["warnings"].iloc[[0, 1, 3]].tolist() == ["", "", ""]
    assert "lies 5.0 mm outside the volume" in features["warnings"].iloc[2]
    assert list(json.loads(result.sidecar.read_text())["flagged_rows"]) == ["2"]
    patch = crop_patch(read_volume(manifest.paths[2]), moved, get_profile("fmcib"))
    with torch.inference_mode():
        expected = load_model(MODEL, None, seed=0).model.eval()(torch.from_numpy(patch[None])).numpy()[0]
    np.testing.assert_allclose(features[FEATS].to_numpy()[2], expected, atol=1e-5)
    # fmcib-centred refuses the row; no warnings column then
    centred = run(manifest, tmp_path / "c.parquet", profile="fmcib-centred", on_error="skip")
    assert list(centred.errors) == [2] and "5.0 mm outside" in centred.errors[2]
    assert "warnings" not in pd.read_parquet(tmp_path / "c.parquet").columns


def test_resume_after_interruption(demo, base, tmp_path, monkeypatch):
    _, good = base
    out = tmp_path / "f.parquet"
    partial = tmp_path / "f.partial"
    original = FeatureRunner.__call__
    calls: list[int] = []

    def interrupt_after_first_batch(self, batch):
        if calls:
            raise KeyboardInterrupt
        calls.append(batch.shape[0])
        return original(self, batch)

    monkeypatch.setattr(FeatureRunner, "__call__", interrupt_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        run(demo.manifest, out, flush_every=1)
    assert calls == [3]
    assert not out.exists()
    rows, paths, feats = partial_rows(partial)
    assert rows == [0, 1, 2]
    assert paths == demo.manifest.paths[:3]
    np.testing.assert_allclose(feats, good[FEATS].to_numpy()[:3], atol=1e-5)

    counted: list[int] = []

    def counting(self, batch):
        counted.append(batch.shape[0])
        return original(self, batch)

    monkeypatch.setattr(FeatureRunner, "__call__", counting)
    with pytest.raises(MedfmError, match="other settings"):  # resuming with other settings is refused
        run(demo.manifest, out, flush_every=1, resume=True, column_prefix="pred_")
    assert counted == []
    assert partial.is_dir()

    result = run(demo.manifest, out, flush_every=1, resume=True)
    assert sum(counted) == 5  # only rows 3..7 went through the model
    assert result.n_rows == 8
    assert not partial.exists()
    table = pd.read_parquet(out)
    pd.testing.assert_frame_equal(table.drop(columns=FEATS), good.drop(columns=FEATS))
    np.testing.assert_allclose(table[FEATS].to_numpy(), good[FEATS].to_numpy(), atol=1e-5)


def test_missing_published_weights(demo, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path / "home"))
    out = tmp_path / "f.parquet"
    with pytest.raises(WeightsError, match="medfm weights download fmcib-resnet50") as info:
        extract_features(demo.manifest, out, model="fmcib-resnet50", num_workers=0, progress=False, device="cpu")
    assert str(tmp_path / "home" / "weights" / "model_weights.torch") in str(info.value)
    assert not out.exists()


def test_bf16_close_to_fp32(half, base, tmp_path):
    _, good = base
    out = tmp_path / "bf16.parquet"
    result = run(half, out, precision="bf16")
    got = pd.read_parquet(out)[FEATS].to_numpy()
    want = good[FEATS].to_numpy()[:4]
    assert got.dtype == np.float32 and got.shape == want.shape
    assert not np.array_equal(got, want)  # bf16 really ran
    per_row = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    assert per_row.max() < 0.05
    assert json.loads(result.sidecar.read_text())["precision"] == "bf16"


def test_unknown_precision_and_on_error(demo, tmp_path):
    with pytest.raises(ValueError, match="precision"):
        run(demo.manifest, tmp_path / "a.parquet", precision="fp8")
    with pytest.raises(ValueError, match="on_error"):
        run(demo.manifest, tmp_path / "b.parquet", on_error="ignore")


def test_a_gapped_series_is_a_row_error_or_a_flagged_row_with_irregular_series_resample(tmp_path):
    import json

    from test_io import BROKEN, EVEN, HINT, SERIES_UID, write_stack

    write_stack(tmp_path / "gapped", BROKEN["gap"][0])
    full = write_stack(tmp_path / "full", EVEN)
    pd.DataFrame({"image_path": ["gapped"], "coordX": [-4.0], "coordY": [-3.0], "coordZ": [27.5]}).to_csv(
        tmp_path / "m.csv", index=False
    )
    manifest = read_manifest(tmp_path / "m.csv")
    skipped = run(manifest, tmp_path / "skip.parquet", on_error="skip")
    assert skipped.errors == {0: f"series {SERIES_UID}: {BROKEN['gap'][1]}{HINT} (irregular_series='resample')"}
    result = run(manifest, tmp_path / "f.parquet", irregular_series="resample")
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["irregular_series"] == "resample"
    assert sidecar["flagged_rows"] == {
        "0": f"read anyway: series {SERIES_UID}: {BROKEN['gap'][1]}; slices interpolated by position"
    }
    # the features are those of the same scan with its missing slice present (values linear in z: exact)
    model = load_model(MODEL, None, seed=0).model.eval()
    with torch.inference_mode():
        expected = model(
            torch.from_numpy(crop_patch(read_volume(full), (-4.0, -3.0, 27.5), get_profile("fmcib"))[None])
        )
    np.testing.assert_allclose(
        pd.read_parquet(result.features)[FEATS].to_numpy()[0], expected.numpy()[0], rtol=1e-4, atol=1e-5
    )


def test_resume_recomputes_rows_whose_inputs_changed(demo, tmp_path, monkeypatch):
    """A seed moved 15 mm and two swapped rows are noticed by their row digests and computed again; the rest is
    kept, and the table equals an uninterrupted run on the changed manifest."""
    table = pd.read_csv(demo.manifest_path)
    manifest = write_manifest(demo, table, "changing.csv")
    out = tmp_path / "f.parquet"
    original = FeatureRunner.__call__
    calls: list[int] = []

    def interrupt_after_two_batches(self, batch):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(batch.shape[0])
        return original(self, batch)

    monkeypatch.setattr(FeatureRunner, "__call__", interrupt_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        run(manifest, out, flush_every=1)
    assert partial_rows(tmp_path / "f.partial")[0] == [0, 1, 2, 3, 4, 5]

    changed = table.copy()
    changed.loc[4, "coordZ"] += 15.0  # a seed moved 15 mm
    changed.iloc[[1, 2]] = changed.iloc[[2, 1]].to_numpy()  # two rows swapped
    assert not changed.iloc[1].equals(table.iloc[1])
    manifest = write_manifest(demo, changed, "changing.csv")
    monkeypatch.setattr(FeatureRunner, "__call__", original)
    result = run(manifest, out, flush_every=1, resume=True)
    assert result.n_computed == 5  # rows 1, 2 and 4 again, and the unfinished 6 and 7
    fresh = run(manifest, tmp_path / "fresh.parquet")
    assert fresh.n_computed == 8
    got, want = pd.read_parquet(out), pd.read_parquet(tmp_path / "fresh.parquet")
    pd.testing.assert_frame_equal(got.drop(columns=FEATS), want.drop(columns=FEATS))
    np.testing.assert_allclose(got[FEATS].to_numpy(), want[FEATS].to_numpy(), atol=1e-5)


def test_weights_none_needs_an_explicit_random_init(demo, tmp_path):
    out = tmp_path / "f.parquet"
    with pytest.raises(ConfigError, match=r"randomly initialised trunk: pass random_init=True"):
        run(demo.manifest, out, random_init=False, weights=None)
    assert not out.exists() and not list(tmp_path.iterdir())
    result = run(demo.manifest, out, random_init=True, weights=None)
    assert result.n_rows == len(demo.manifest)


def test_manifest_columns_colliding_with_the_output_are_refused_before_the_work(demo, base, tmp_path):
    _, good = base
    again = demo.folder / "own_output.parquet"  # its own earlier output used as a manifest: feat_* already there
    good.to_parquet(again, index=False)
    out = tmp_path / "f.parquet"
    with pytest.raises(OutputError) as info:
        run(read_manifest(again), out)
    assert str(info.value) == (
        f"manifest {again}: column 'feat_0' collides with the feature columns feat_<i> (an earlier extraction's "
        "output?); give another --column-prefix, or rename or drop those columns"
    )
    table = pd.read_csv(demo.manifest_path)
    table.insert(0, "row", range(len(table)))
    with pytest.raises(OutputError, match=r"column 'row' is one medfm writes itself; rename it in the manifest$"):
        run(write_manifest(demo, table, "with_row.csv"), out)
    (tmp_path / "folder.parquet").mkdir()
    with pytest.raises(OutputError, match=r"^--out .*folder\.parquet is a folder; name a file to write$"):
        run(demo.manifest, tmp_path / "folder.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.parquet"]


def test_kill_9_keeps_finished_rows_and_the_resumed_table_equals_an_uninterrupted_run(demo, base, tmp_path):
    """SIGKILL at a random point of a run that keeps rows by time (flush_seconds=0): the rows it finished are kept,
    --resume computes only the others (taking over the dead run's lock), and the table equals base's."""
    _, good = base
    out, partial = tmp_path / "f.parquet", tmp_path / "f.partial"
    script = (
        "from medfm.data.manifest import read_manifest\n"
        "from medfm.features.extract import extract_features\n"
        f"extract_features(read_manifest({str(demo.manifest_path)!r}), {str(out)!r}, model={MODEL!r}, "
        "random_init=True, num_workers=0, progress=False, batch_size=1, device='cpu', flush_seconds=0.0)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(medfm.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    kill_after = random.Random(19).randint(1, 6)  # rows kept before the kill
    process = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.monotonic() + 600
    try:
        while len(partial_rows(partial)[0]) < kill_after:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not out.exists() and (tmp_path / ".f.parquet.lock").exists()
    kept, _, feats = partial_rows(partial)
    assert kill_after <= len(kept) < 8 and kept == sorted(kept)
    np.testing.assert_allclose(feats, good[FEATS].to_numpy()[kept], atol=1e-5)
    result = run(demo.manifest, out, resume=True)
    assert result.n_computed == 8 - len(kept)  # finished rows were not computed again
    table = pd.read_parquet(out)
    pd.testing.assert_frame_equal(table.drop(columns=FEATS), good.drop(columns=FEATS))
    np.testing.assert_allclose(table[FEATS].to_numpy(), good[FEATS].to_numpy(), atol=1e-5)
    assert not partial.exists() and not (tmp_path / ".f.parquet.lock").exists()
