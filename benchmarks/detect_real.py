"""Does a trunk pre-trained elsewhere help box detection with little data? Brain-tumour boxes on real MRI slices.

Data: ../shared/data/brain_tumor_mri — 600 T1-CE slices (512² JPEG), three tumour types (pituitary, meningioma,
glioma), one YOLO box each; downscaled to ``--size`` (96²) grey. Seeded per-image hold-outs stratified by class:
20% test (120 images), 10% validation, the rest training (``--train-fraction``, 50%, of it: 210 images).
Detector: ``medfm.detect`` Faster R-CNN + FPN on a 1-channel torchvision ResNet18, anchors 8…128 px.
Trunks: random init, or supervised on PneumoniaMNIST chest X-rays (28², normal vs pneumonia: another modality
and task), pre-trained first with ``medfm.pretrain`` (method ``supervised``) for ``--pretrain-epochs``; each
fine-tuned unfrozen (``freeze: none``) and, for the CXR trunk, frozen (``freeze: trunk``: FPN, RPN and box head
train on fixed features; ``--arms`` adds random/trunk), for ``--seeds`` seeds (the seed moves the split, the initialisation of the new layers and the views).
Printed per arm: test COCO-style mAP@[.40:.75] (``map_40_75``; not the Kaggle RSNA score) mean ± sd over seeds, seed 0's 95% bootstrap CI over
images, mAP@0.5 mean ± sd, recall, and the seconds per run. Validation runs once, after the last epoch.

Run: ``.venv/bin/python benchmarks/detect_real.py [--seeds 3 --epochs 8 --size 96 --train-fraction 0.5]``
(about 15 minutes on 2 CPU cores; images are decoded once per process and shared by the runs). One intra-op
thread is the default: on a 2-core machine that others share, two OpenMP threads run several times slower.
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
from medfm.detect.data import DetectData
from medfm.detect.module import DetectModule
from medfm.pretrain.data import PretrainData
from medfm.pretrain.module import PretrainModule
from medmnist_runs import DATA, cpu_trainer, load

CLASSES = ["pituitary", "meningioma", "glioma"]


def pretrain_supervised(tmp: Path, epochs: int) -> Path:
    """A 1-channel ResNet18 trained to tell pneumonia from normal on PneumoniaMNIST; returns its trunk's weights."""
    images, labels, splits = load(DATA / "pneumoniamnist" / "pneumoniamnist_reconstructed.npz")
    store = store_from_arrays(images, tmp / "cxr_store", (28, 28), 0, labels=labels, splits=splits)
    pl.seed_everything(0, verbose=False)
    module = PretrainModule(
        method="supervised",
        trunk="resnet18",
        num_classes=2,
        optimizer="adamw",
        lr=1e-3,
        lr_scaling="none",
        weight_decay=1e-4,
        warmup_epochs=0.2,
    )
    view = [{"op": "flip", "axes": [1], "p": 0.5}]
    cpu_trainer(epochs).fit(module, PretrainData(store=str(store.root), batch_size=128, view=view, views=1))
    path = tmp / "cxr_supervised_resnet18.pt"
    torch.save(module.trunk.state_dict(), path)
    return path


def detect(init: str, freeze: str, seed: int, args: argparse.Namespace) -> DetectModule:
    """One detection run, tested once; the module keeps its test results."""
    pl.seed_everything(seed, verbose=False)
    data = DetectData(
        str(DATA / "brain_tumor_mri"),
        format="yolo",
        class_names=CLASSES,
        image_size=args.size,
        split_seed=seed,
        test_size=0.2,
        val_size=0.125,
        train_fraction=args.train_fraction,
        fraction_seed=seed,
        batch_size=8,
        seed=seed,
    )
    module = DetectModule(
        classes=data.classes,
        input_spec=data.input_spec,
        trunk="resnet18",
        init=init,
        min_coverage=0.9,
        freeze=freeze,
        anchor_sizes=[8, 16, 32, 64, 128],
        fpn_channels=64,
        rpn_proposals=200,
        roi_samples=64,
        head_width=128,
        lr_trunk=1e-3,
        lr_head=1e-3,
        warmup_epochs=0.5,
        n_bootstrap=args.bootstrap,
    )
    trainer = cpu_trainer(args.epochs, check_val_every_n_epoch=args.epochs)
    trainer.fit(module, data)
    trainer.test(module, datamodule=data, verbose=False)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8, help="detection epochs")
    parser.add_argument("--size", type=int, default=96, help="input side in pixels (the slices are 512²)")
    parser.add_argument("--train-fraction", type=float, default=0.5, help="share of the training images")
    parser.add_argument("--pretrain-epochs", type=int, default=2, help="supervised PneumoniaMNIST epochs")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples of the test CI")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--arms",
        nargs="+",
        default=["random/none", "cxr/none", "cxr/trunk"],
        help="trunk/freeze pairs; trunk random or cxr, freeze none or trunk (also random/trunk: random features)",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if not (DATA / "brain_tumor_mri").is_dir() or not (DATA / "pneumoniamnist").is_dir():
        print(f"brain_tumor_mri or pneumoniamnist not found under {DATA}; nothing to run")
        return
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        weights = pretrain_supervised(Path(tmp), args.pretrain_epochs) if any("cxr" in a for a in args.arms) else None
        print(
            f"brain tumour MRI boxes, {args.size}² grey, Faster R-CNN + FPN on ResNet18, {args.epochs} epochs, "
            f"train fraction {args.train_fraction:g}, {args.seeds} seeds; CXR trunk: supervised on PneumoniaMNIST "
            f"for {args.pretrain_epochs} epochs ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        print(
            f"{'trunk':<8}{'freeze':<8}{'mAP@[.4:.75] mean ± sd':<25}{'seed 0 (95% CI)':<24}"
            f"{'mAP@0.5 mean ± sd':<20}{'recall':<9}{'s/run':>6}",
            flush=True,
        )
        for arm in args.arms:
            source, freeze = arm.split("/")
            init = "random" if source == "random" else str(weights)
            maps, map50, recall, took, ci = [], [], [], [], None
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                module = detect(init, freeze, seed, args)
                took.append(time.perf_counter() - t0)
                test = module.test_results
                maps.append(test["map"]["value"])
                map50.append(test["map_50"]["value"])
                recall.append(test["mar"]["value"])
                ci = ci or test["map"]
            print(
                f"{source:<8}{freeze:<8}{np.mean(maps):.3f} ± {np.std(maps):.3f}{'':<12}"
                f"{ci['value']:.3f} ({ci['low']:.3f}–{ci['high']:.3f}){'':<3}"
                f"{np.mean(map50):.3f} ± {np.std(map50):.3f}{'':<5}{np.mean(recall):.3f}{'':<4}{np.mean(took):>6.0f}",
                flush=True,
            )
        print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
