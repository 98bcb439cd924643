"""`medfm extract --devices 2`: two real gloo processes (Lightning Fabric) write the table one process writes —
same rows, order, features and bad rows; a bad row stops both, and `--resume` goes on from every rank's parts."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch.distributed as dist

from ddp_runs import TIMEOUT, free_port, medfm_script
from medfm.data.synthetic import make_demo_dataset

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """3 phantoms (4 seeds each) and one row whose scan is missing, between them."""
    folder = tmp_path_factory.mktemp("extract_ddp")
    table = pd.read_csv(make_demo_dataset(folder, n_patients=3))
    missing = table.iloc[[0]].assign(image_path="images/missing.nii.gz", patient_id="PX")
    table = pd.concat([table.iloc[:5], missing, table.iloc[5:]], ignore_index=True)
    table.to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def extract(manifest: Path, out: Path, devices: int, *extra: str) -> subprocess.CompletedProcess:
    """Run `medfm extract` (random-init resnet10-3d on the CPU) as its own process, or as ``devices`` processes."""
    argv = [medfm_script(), "extract", str(manifest), "--model", "resnet10-3d", "--random-init", "--out", str(out)]
    argv += ["--device", "cpu", "--batch-size", "3", "--quiet", "--devices", str(devices), *extra]
    env = {
        **os.environ,
        "GLOO_SOCKET_IFNAME": "lo",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TIMEOUT, cwd=out.parent)


@pytest.fixture(scope="module")
def single(manifest) -> Path:
    """The table of one process."""
    out = manifest.with_name("one.parquet")
    done = extract(manifest, out, 1, "--on-error", "skip")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_two_processes_write_the_table_of_one(manifest, single, tmp_path):
    double = tmp_path / "two.parquet"
    done = extract(manifest, double, 2, "--on-error", "skip")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote features of 12 rows") == 1  # rank 1 stays quiet
    one, two = pd.read_parquet(single), pd.read_parquet(double)
    assert len(one) == 12 and list(two.columns) == list(one.columns)
    pd.testing.assert_frame_equal(two.drop(columns=[c for c in two if c.startswith("feat_")]),
                                  one.drop(columns=[c for c in one if c.startswith("feat_")]))  # fmt: skip
    features = [c for c in one if c.startswith("feat_")]
    np.testing.assert_allclose(two[features].to_numpy(), one[features].to_numpy(), rtol=1e-5, atol=1e-6)
    errors = [pd.read_csv(out.with_name(out.stem + ".errors.csv")) for out in (single, double)]
    pd.testing.assert_frame_equal(errors[0], errors[1])
    assert errors[1]["row"].tolist() == [5] and "missing.nii.gz" in errors[1]["image_path"].iloc[0]
    sidecars = [json.loads(out.with_suffix(".json").read_text()) for out in (single, double)]
    assert (sidecars[0]["processes"], sidecars[1]["processes"]) == (1, 2)
    assert sidecars[1]["n_rows"] == 12 and sidecars[1]["n_errors"] == 1
    assert not double.with_name("two.partial").exists()


def test_a_bad_row_stops_both_and_resume_uses_every_ranks_parts(manifest, single, tmp_path):
    out = tmp_path / "f.parquet"
    stopped = extract(manifest, out, 2, "--on-error", "raise")
    assert stopped.returncode == 2
    assert "row 5" in stopped.stderr and "missing.nii.gz" in stopped.stderr
    assert not out.exists()
    kept = list(out.with_name("f.partial").glob("part-r*.npz"))
    assert kept, "finished rows were not kept for --resume"
    resumed = extract(manifest, out, 2, "--on-error", "skip", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_table, reference = pd.read_parquet(out), pd.read_parquet(single)
    features = [c for c in reference if c.startswith("feat_")]
    assert resumed_table["image_path"].tolist() == reference["image_path"].tolist()
    np.testing.assert_allclose(resumed_table[features].to_numpy(), reference[features].to_numpy(), rtol=1e-5, atol=1e-6)
