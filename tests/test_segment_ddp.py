"""`medfm segment fit` on two real gloo DDP ranks equals one process: the same training steps, and validation and
test metrics gathered over the ranks with every case counted once (3 validation and 3 test cases do not divide over 2
ranks, so the sampler pads a rank with a repeated case that must not count twice)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch.distributed as dist
import yaml
from PIL import Image

from ddp_runs import finish, free_port, metrics, step_losses

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """14 disc images 40×40: 8 train, 3 val, 3 test."""
    folder = tmp_path_factory.mktemp("seg_ddp")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :40]
    rows = []
    for i in range(14):
        disc = (yy - rng.uniform(14, 26)) ** 2 + (xx - rng.uniform(14, 26)) ** 2 <= rng.uniform(6, 10) ** 2
        Image.fromarray(np.clip(60 + 120 * disc + rng.normal(0, 20, disc.shape), 0, 255).astype(np.uint8)).save(
            folder / f"img{i}.png"
        )
        Image.fromarray(disc.astype(np.uint8)).save(folder / f"mask{i}.png")
        split = "train" if i < 8 else "val" if i < 11 else "test"
        rows.append({"image_path": f"img{i}.png", "mask_path": f"mask{i}.png", "split": split})
    pd.DataFrame(rows).to_csv(folder / "discs.csv", index=False)
    return folder / "discs.csv"


def run(folder: Path, manifest: Path, devices: int, batch_size: int) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "seed_everything": 0,
        "trainer": {"default_root_dir": str(folder / "run"), "max_epochs": 1, "accelerator": "cpu",
                    "devices": devices, "sync_batchnorm": True, "log_every_n_steps": 1,
                    "enable_model_summary": False, "enable_progress_bar": False, "num_sanity_val_steps": 0,
                    **({"strategy": "ddp"} if devices > 1 else {})},
        "model": {"encoder": "resnet18", "in_channels": 1, "decoder_channels": [16, 8, 8, 8, 8], "n_bootstrap": 20},
        "data": {"manifest": str(manifest), "classes": ["disc"], "profile": "gray-224", "split_column": "split",
                 "samples_per_case": 1, "batch_size": batch_size},
    }  # fmt: skip
    (folder / "seg.yaml").write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "GLOO_SOCKET_IFNAME": "lo",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }
    argv = [sys.executable, "-m", "medfm.segment.launch", "fit", "--config", str(folder / "seg.yaml")]
    log = (folder / "log.txt").open("wb")
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)


def test_two_ranks_train_and_score_like_one_process(manifest, tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    procs = [(run(ddp, manifest, 2, 2), ddp), (run(single, manifest, 1, 4), single)]
    for proc, folder in procs:
        finish(proc, folder)
    a, b = step_losses(ddp), step_losses(single)
    assert sorted(a) == sorted(b) == [0, 1]  # 8 training images, global batch 4
    assert np.allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], rtol=1e-3, atol=1e-4)
    val_a = metrics(ddp)["val/dice"].dropna().to_numpy()
    val_b = metrics(single)["val/dice"].dropna().to_numpy()
    assert len(val_a) == len(val_b) == 1 and np.allclose(val_a, val_b, atol=1e-3)
    res_a, res_b = (json.loads(next((f / "run").rglob("results.json")).read_text()) for f in (ddp, single))
    assert res_a["test"]["n"] == res_b["test"]["n"] == {"value": 3.0, "cases": 3}
    assert res_a["test"]["dice"]["value"] == pytest.approx(res_b["test"]["dice"]["value"], abs=1e-3)
