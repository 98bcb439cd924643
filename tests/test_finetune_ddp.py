"""Fine-tuning on the DDP path of pre-training: two real gloo processes on the CPU train with one process's loss.

``medfm finetune fit`` runs twice from the same config: on two ranks with 2 samples each (DDP, sync_batchnorm, which
on the CPU is :class:`medfm.train.distributed.GlobalBatchNorm`) and on one process with 4. The 8 training rows are
two global batches, so the EpochSampler (rank r takes ``order[r::2]`` of the epoch's permutation; drop_last=False
pads only when the rows do not divide) gives both runs the same 4 rows per step, and the views are seeded per
(seed, epoch, row), so the augmentations match too. Binary: the BCE mean of two equal halves is the mean of the
whole batch (class weights come from all the training rows on every rank). Survival: the Cox loss gathers the risks
of both ranks, so each rank's loss is the global batch's. Validation outputs are gathered over the ranks and
deduplicated, so the validation (and test) metrics of the two runs are those of the same rows and outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import yaml

from ddp_runs import finish, metrics, start, step_losses
from medfm.data.synthetic import make_demo_dataset

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

VIEW = [
    {"op": "shift", "max_voxels": 4, "p": 1.0},
    {"op": "center_crop", "size": [16, 16, 16]},
    {"op": "flip", "axes": [0, 1, 2], "p": 0.5},
]
EVAL_VIEW = [{"op": "center_crop", "size": [16, 16, 16]}]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Four phantoms of 4 lesions: 8 training rows (patients 0-1, two global batches of 4), 4 val and 4 test rows.

    Binary label: solid lesions (2 of 8 training rows, so the balanced class weights give pos_weight 3). Survival:
    distinct times, events in 3 rows of 4 (so every batch has an event with others at risk: checked below)."""
    path = make_demo_dataset(tmp_path_factory.mktemp("ft_ddp_demo"), n_patients=4)
    table = pd.read_csv(path)
    table["label"] = (table["lesion_type"] == "solid").astype(int)
    table["split"] = table["patient_id"].map({"P000": "train", "P001": "train", "P002": "val", "P003": "test"})
    rng = np.random.default_rng(0)
    table["time"] = rng.permutation(len(table)) * 30.0 + 100.0
    table["event"] = (np.arange(len(table)) % 4 != 3).astype(int)
    table.to_csv(path, index=False)
    return path


def write_config(folder: Path, manifest: Path, task: str) -> Path:
    survival = task == "survival"
    config = {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(folder / "run"),
            "max_epochs": 5,
            "accelerator": "cpu",
            "enable_model_summary": False,
            "enable_progress_bar": False,
        },
        "model": {
            "task": task,
            "trunk": "resnet3d",
            "trunk_args": {"depth": 10, "widen_factor": 0.25},
            "head": [8, 1],
            "dropout": 0.0,
            "class_weights": None if survival else "balanced",
            "optimizer": "adamw",
            "lr_trunk": 1.0e-3,
            "lr_head": 1.0e-2,
            "n_bootstrap": 20,
        },
        "data": {
            "manifest": str(manifest),
            "task": task,
            "profile": "fmcib",
            "label_column": "label",
            "time_column": "time" if survival else None,
            "event_column": "event" if survival else None,
            "split_column": "split",
            "margin": 0,
            "batch_size": 4,
            "cache_dir": str(folder / "stores"),
            "view": VIEW,
            "eval_view": EVAL_VIEW,
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "task.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def logged(folder: Path, column: str) -> list[float]:
    table = metrics(folder)
    return table[column].dropna().astype(float).tolist() if column in table.columns else []


def results(folder: Path) -> dict:
    (found,) = (folder / "run").rglob("results.json")
    return json.loads(found.read_text())


@pytest.fixture(scope="module", params=["binary", "survival"])
def runs(request, manifest, tmp_path_factory) -> tuple[str, Path, Path]:
    """The same config fine-tuned on two gloo ranks (batch 2 each) and on one process (batch 4), side by side."""
    root = tmp_path_factory.mktemp(f"ft_ddp_{request.param}")
    ddp, single = root / "ddp", root / "single"
    procs = [
        (start("finetune", ddp, write_config(ddp, manifest, request.param), devices=2, batch_size=2), ddp),
        (start("finetune", single, write_config(single, manifest, request.param), devices=1, batch_size=4), single),
    ]
    for proc, folder in procs:
        finish(proc, folder)
    return request.param, ddp, single


def test_every_global_batch_has_a_cox_loss(manifest):
    """The survival comparison means something only when the Cox loss of each global batch is not 0: an event with
    someone else still at risk (zero risks give the mean log of the numbers at risk)."""
    from medfm.finetune.losses import cox_loss
    from medfm.train.sampler import EpochSampler

    table = pd.read_csv(manifest)
    train = table[table["split"] == "train"].reset_index(drop=True)
    order = [i for i, _ in EpochSampler(len(train), shuffle=True, seed=0, drop_last=False)]
    assert len(order) == 8
    for first in range(0, len(order), 4):
        batch = train.iloc[order[first : first + 4]]
        time, event = (torch.tensor(batch[c].to_numpy(), dtype=torch.float32) for c in ("time", "event"))
        assert float(cox_loss(torch.zeros(4), time, event)) > 0.1


def test_ddp_finetune_loss_equals_single_process_loss(runs):
    _, ddp, single = runs
    ddp_losses, single_losses = step_losses(ddp), step_losses(single)
    print(f"\nDDP losses {ddp_losses}\nsingle-process losses {single_losses}")
    assert sorted(ddp_losses) == sorted(single_losses) == [0, 1]
    assert np.isfinite(list(ddp_losses.values())).all()
    assert ddp_losses[0] > 0
    # Step 0: the same global batch through the same weights (the batch norms see the global batch's moments).
    assert ddp_losses[0] == pytest.approx(single_losses[0], abs=1e-4)
    # Step 1: after one AdamW update. Gradients agree to float32 rounding only (DDP all-reduces two half-batch
    # gradients; convolutions on half batches sum in another order), and AdamW's first step moves every weight by
    # about lr * sign(gradient), so a weight whose gradient is ~0 may move either way: a looser tolerance. (The runs
    # here agree to ~2e-6 at both steps; a Cox loss over each rank's half batch only misses by ~0.5 at step 0, batch
    # norms that are not synchronised by 0.05-0.3.)
    assert ddp_losses[1] == pytest.approx(single_losses[1], abs=1e-3)
    log = (ddp / "log.txt").read_text()
    assert "GLOBAL_RANK: 1" in log and "distributed_backend=gloo" in log  # two gloo ranks really ran


def test_ddp_finetune_validation_and_test_metrics_equal_single_process(runs):
    task, ddp, single = runs
    metric = "val/c_index" if task == "survival" else "val/auroc"
    for column in (metric, "val/loss"):
        a, b = logged(ddp, column), logged(single, column)
        print(f"{column}: DDP {a}, single process {b}")
        assert len(a) == len(b) == 1  # one validation after the one epoch of 2 steps
        assert a == pytest.approx(b, abs=1e-4)
    ra, rb = results(ddp), results(single)
    assert ra["sizes"] == rb["sizes"] == {"train": 8, "val": 4, "test": 4, "unused": 0, "unlabelled": 0}
    assert ra["test"]["n"]["value"] == rb["test"]["n"]["value"] == 4  # each test row once, not padded per rank
    for name, interval in rb["test"].items():
        assert ra["test"][name]["value"] == pytest.approx(interval["value"], abs=1e-4, nan_ok=True), name
