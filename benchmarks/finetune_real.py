"""How much does initialisation matter with little data and in the first epochs? Fine-tuning on real data.

For each data set, a trunk is pre-trained first with ``medfm.pretrain`` (SimCLR, labels unused):
- 3D: AdrenalMNIST3D 28³ (../shared/data/adrenalmnist3d), MONAI 3D ResNet10 (widen 0.5, first-conv stride 2),
  SimCLR on its own training volumes;
- 2D: BreastMNIST 28² ultrasound (../shared/data/breastmnist), 1-channel ResNet18, SimCLR on PneumoniaMNIST chest
  X-rays (another data set and modality: a trunk "from elsewhere").
Then the whole network (trunk + linear head) is fine-tuned from random init and from the pre-trained trunk, with
100% and 10% of the training labels, for several seeds (``medfm.finetune``: AdamW, warm-up + cosine per step, the
best validation epoch restored, tested once on the official test split with a 95% bootstrap CI). Printed: test AUC
mean ± sd over seeds (and the CI of seed 0), and the mean validation AUC of the first epochs.

Run: ``.venv/bin/python benchmarks/finetune_real.py [--sets 3d 2d --seeds 3 --epochs 10]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from medfm.data.store import store_from_arrays
from medfm.finetune.data import FinetuneData
from medfm.finetune.module import FinetuneModule
from medfm.pretrain.data import PretrainData
from medfm.pretrain.module import PretrainModule
from medmnist_runs import DATA, cpu_trainer, load, ssl_view

SETS = {
    "3d": {
        "name": "AdrenalMNIST3D 28³",
        "file": "adrenalmnist3d/adrenalmnist3d.npz",
        "pretrain_file": "adrenalmnist3d/adrenalmnist3d.npz",
        "size": (24, 24, 24),
        "trunk": "resnet3d",
        "trunk_args": {"depth": 10, "widen_factor": 0.5, "conv1_t_stride": 2},
        "batch": 32,
    },
    "2d": {
        "name": "BreastMNIST 28²",
        "file": "breastmnist/breastmnist.npz",
        "pretrain_file": "pneumoniamnist/pneumoniamnist_reconstructed.npz",
        "size": (24, 24),
        "trunk": "resnet18",
        "trunk_args": {},
        "batch": 32,
    },
}


def pretrain(setting: dict, tmp: Path, epochs: int) -> Path:
    """SimCLR on the pre-training images; returns the trunk's weight file."""
    images, labels, splits = load(DATA / setting["pretrain_file"])
    store = store_from_arrays(images, tmp / "ssl_store", setting["size"], 2, labels=labels, splits=splits)
    pl.seed_everything(0, verbose=False)
    module = PretrainModule(
        method="simclr",
        trunk=setting["trunk"],
        trunk_args=setting["trunk_args"],
        projection=[256, 128],
        temperature=0.2,
        optimizer="adamw",
        lr=1e-3,
        lr_scaling="none",
        weight_decay=1e-5,
        warmup_epochs=0.5,
    )
    data = PretrainData(
        store=str(store.root), batch_size=128, view=ssl_view(len(setting["size"]), setting["size"], light=True)
    )
    cpu_trainer(epochs).fit(module, data)
    path = tmp / "simclr_trunk.pt"
    torch.save(module.trunk.state_dict(), path)
    return path


def finetune(setting: dict, store_dir: Path, init: str, fraction: float, seed: int, epochs: int) -> FinetuneModule:
    """One fine-tuning run; the module keeps its history and test results."""
    pl.seed_everything(seed, verbose=False)
    module = FinetuneModule(
        task="binary",
        trunk=setting["trunk"],
        trunk_args=setting["trunk_args"],
        init=init,
        min_coverage=0.9,
        lr_trunk=3e-4,
        lr_head=1e-3,
        weight_decay=1e-4,
        warmup_epochs=1,
        patience=None,
        class_weights="balanced",
        n_bootstrap=1000,
    )
    data = FinetuneData(
        store=str(store_dir),
        task="binary",
        train_fraction=fraction,
        fraction_seed=seed,
        seed=seed,
        batch_size=setting["batch"],
    )
    run = cpu_trainer(epochs)
    run.fit(module, data)
    run.test(module, datamodule=data, verbose=False)
    return module


def run_set(key: str, seeds: int, epochs: int, ssl_epochs: int, shown_epochs: int) -> None:
    setting = SETS[key]
    if not (DATA / setting["file"]).exists() or not (DATA / setting["pretrain_file"]).exists():
        print(f"{setting['name']}: data not found under {DATA}, skipped")
        return
    images, labels, splits = load(DATA / setting["file"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        weights = pretrain(setting, tmp, ssl_epochs)
        print(
            f"\n{setting['name']} ({len(images)} images): trunk {setting['trunk']} {setting['trunk_args']}, "
            f"SimCLR on {setting['pretrain_file'].split('/')[0]} for {ssl_epochs} epochs "
            f"({time.perf_counter() - start:.0f} s); fine-tuning {epochs} epochs, {seeds} seeds",
            flush=True,
        )
        store = store_from_arrays(images, tmp / "store", setting["size"], 2, labels=labels, splits=splits)
        head = f"{'init':<10}{'labels':<8}{'test AUC mean ± sd':<20}{'seed 0 (95% CI)':<24}"
        print(head + "  ".join(f"ep{e}" for e in range(1, shown_epochs + 1)) + "   time/run", flush=True)
        for init_name, init in (("random", "random"), ("simclr", str(weights))):
            for fraction in (1.0, 0.1):
                aucs, curves, ci, took = [], [], None, []
                for seed in range(seeds):
                    t0 = time.perf_counter()
                    module = finetune(setting, store.root, init, fraction, seed, epochs)
                    took.append(time.perf_counter() - t0)
                    auc = module.test_results["auroc"]
                    aucs.append(auc["value"])
                    ci = ci or auc
                    curves.append([row.get("val/auroc", np.nan) for row in module.history[:shown_epochs]])
                curve = np.nanmean(np.array(curves, dtype=float), axis=0)
                print(
                    f"{init_name:<10}{fraction:<8.0%}{np.mean(aucs):.3f} ± {np.std(aucs):.3f}{'':<5}"
                    f"{ci['value']:.3f} ({ci['low']:.3f}–{ci['high']:.3f}){'':<5}"
                    + "  ".join(f"{v:.2f}" for v in curve)
                    + f"   {np.mean(took):.0f} s",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["3d", "2d"], choices=sorted(SETS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
    parser.add_argument("--ssl-epochs", type=int, default=6, help="SimCLR pre-training epochs")
    parser.add_argument("--shown-epochs", type=int, default=10, help="validation AUC of the first N epochs")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for key in args.sets:
        run_set(key, args.seeds, args.epochs, args.ssl_epochs, min(args.shown_epochs, args.epochs))


if __name__ == "__main__":
    main()
