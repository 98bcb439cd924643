"""Does pre-training help? Linear-probe AUC of features from random init vs SimCLR vs mined-negative SimCLR vs
SupCon vs supervised pre-training, on real data, in a CPU budget of minutes.

- 3D: AdrenalMNIST3D at 64³ (../shared/data/adrenalmnist3d), a MONAI 3D ResNet10 (widen 0.5, first-conv stride 2).
  The patch is the centre 24³ of the volume (a 4-voxel margin cached around it for the resized crops); the mined
  negatives are 32³ blocks from elsewhere in the same volume, at least half a block off the centre along one axis.
- 2D: PneumoniaMNIST 28² (../shared/data/pneumoniamnist), a 1-channel torchvision ResNet18 on 24² views.

Each trunk is pre-trained on the training split (SSL methods ignore its labels; SupCon and supervised use them) with
``medfm.pretrain`` (the same LightningModule and data path as ``medfm pretrain fit``), then its pooled features of
the centre view are probed with ``medfm.evaluate.probe.run_probe`` (Optuna-searched logistic regression, train→val,
refit on train+val, judged once on test, 95% bootstrap CI) — with all training labels and with 10% of them
(mean over ``--repeats`` draws). The kNN accuracy on the validation split after the last epoch is printed too.

Run: ``.venv/bin/python benchmarks/ssl_real.py [--epochs-3d 8 --epochs-2d 3 --sets 3d 2d]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch

from medfm.data.augment import build_view, default_view
from medfm.data.store import store_from_arrays
from medfm.evaluate.probe import run_probe
from medfm.pretrain.data import PretrainData
from medfm.pretrain.module import PretrainModule
from medmnist_runs import DATA, cpu_trainer, load, ssl_view

SETTINGS = {
    "3d": {
        "name": "AdrenalMNIST3D 64³",
        "file": "adrenalmnist3d/adrenalmnist3d_64.npz",
        "size": (24, 24, 24),
        "margin": 4,
        "negatives": 2,
        "trunk": "resnet3d",
        "trunk_args": {"depth": 10, "widen_factor": 0.5, "conv1_t_stride": 2},
        "batch": 64,
        "methods": ["random", "simclr", "simclr-mined", "supcon", "supervised"],
    },
    "2d": {
        "name": "PneumoniaMNIST 28²",
        "file": "pneumoniamnist/pneumoniamnist_reconstructed.npz",
        "size": (24, 24),
        "margin": 2,
        "negatives": 0,
        "trunk": "resnet18",
        "trunk_args": {},
        "batch": 128,
        "methods": ["random", "simclr", "supcon", "supervised"],
    },
}


def pretrain(setting: dict, store_dir: Path, method: str, epochs: int, seed: int) -> tuple[torch.nn.Module, dict]:
    """A trunk pre-trained with ``method`` (or left at its seeded random init) and the last logged metrics."""
    dims = len(setting["size"])
    pl.seed_everything(seed, verbose=False)
    module = PretrainModule(
        method="supervised" if method == "supervised" else ("simclr" if method == "random" else method),
        trunk=setting["trunk"],
        trunk_args=setting["trunk_args"],
        in_channels=1,
        projection=[256, 128],
        temperature=0.2,
        num_classes=2,
        optimizer="adamw",
        lr=1e-3,
        lr_scaling="none",
        weight_decay=1e-5,
        warmup_epochs=0.5,
    )
    if method == "random":
        return module.trunk.eval(), {}
    data = PretrainData(
        store=str(store_dir),
        batch_size=setting["batch"],
        view=ssl_view(dims, setting["size"]),
        mined_negatives=setting["negatives"] if method == "simclr-mined" else 0,
        seed=seed,
    )
    trainer = cpu_trainer(epochs)
    trainer.fit(module, data)
    return module.trunk.eval(), {k: float(v) for k, v in trainer.callback_metrics.items()}


@torch.no_grad()
def features(trunk: torch.nn.Module, patches: np.ndarray, size: tuple[int, ...], batch: int = 256) -> np.ndarray:
    """Pooled trunk features of the centre view of every stored patch."""
    view = build_view(default_view(len(size), size, "eval"), len(size))
    out = []
    for start in range(0, len(patches), batch):
        x = np.stack([view(np.asarray(p), 0) for p in patches[start : start + batch]])
        out.append(trunk(torch.from_numpy(x)).float().numpy())
    return np.concatenate(out)


def probe(feats: np.ndarray, labels: np.ndarray, splits: np.ndarray, trials: int, repeats: int) -> dict[str, object]:
    """Test AUC with CI at all labels, and mean ± std at 10% of the training labels."""
    table = pd.DataFrame(feats, columns=[f"feat_{i}" for i in range(feats.shape[1])])
    table.insert(0, "label", labels)
    table.insert(1, "split", splits)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = run_probe(table, "label", tmp, trials=trials, progress=False).test_metric
        tenth = [
            run_probe(
                table, "label", tmp, trials=trials, progress=False, train_fraction=0.1, fraction_seed=r
            ).test_metric.value
            for r in range(repeats)
        ]
    return {"full": full, "tenth": (float(np.mean(tenth)), float(np.std(tenth)))}


def run_set(key: str, epochs: int, trials: int, repeats: int, seed: int) -> None:
    setting = SETTINGS[key]
    path = DATA / setting["file"]
    if not path.exists():
        print(f"{setting['name']}: {path} not found, skipped")
        return
    images, labels, splits = load(path)
    with tempfile.TemporaryDirectory() as tmp:
        store = store_from_arrays(
            images,
            Path(tmp) / "store",
            setting["size"],
            setting["margin"],
            setting["negatives"],
            labels=labels,
            splits=splits,
            seed=seed,
        )
        print(
            f"\n{setting['name']}: {len(images)} images, {epochs} epochs, trunk {setting['trunk']} {setting['trunk_args']}"
        )
        print(
            f"{'init':<14}{'test AUC (95% CI), all labels':<32}{'10% labels (mean ± sd)':<24}{'val kNN acc':<12}{'time':>6}"
        )
        for method in setting["methods"]:
            start = time.perf_counter()
            trunk, metrics = pretrain(setting, store.root, method, epochs, seed)
            result = probe(features(trunk, store.patches, setting["size"]), labels, splits, trials, repeats)
            full, (tenth, spread) = result["full"], result["tenth"]
            knn = metrics.get("val/knn_acc")
            print(
                f"{method:<14}{full.value:.3f} ({full.low:.3f}–{full.high:.3f}){'':<13}{tenth:.3f} ± {spread:.3f}"
                f"{'':<9}{'' if knn is None else f'{knn:.3f}':<12}{time.perf_counter() - start:>5.0f}s",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["3d", "2d"], choices=sorted(SETTINGS))
    parser.add_argument("--epochs-3d", type=int, default=8)
    parser.add_argument("--epochs-2d", type=int, default=3)
    parser.add_argument("--trials", type=int, default=20, help="Optuna trials of each probe")
    parser.add_argument("--repeats", type=int, default=3, help="draws of the 10%% training subset")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for key in args.sets:
        run_set(key, args.epochs_3d if key == "3d" else args.epochs_2d, args.trials, args.repeats, args.seed)


if __name__ == "__main__":
    main()
