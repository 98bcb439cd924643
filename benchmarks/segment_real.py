"""Does a pre-trained encoder help a U-Net segment real CT with little data? Liver and lung on TotalSegmentator's CTs.

Data (../shared/data/totalsegmentator_example): the example CT (122×101×30 at 3 mm) with its TotalSegmentator v2
segmentation, and the 20-slice DICOM series (512×512 at 0.98×0.98×2 mm) with its own segmentation — stored on a
y-flipped grid, which medfm's mask check recognises as the same voxels and reorients losslessly. Both are turned to
LPS order, the DICOM series resampled to 3 mm in-plane (image linear, mask nearest), and cut into axial slices
written as 8-bit PNG (window −1000…400 HU) with their raw label PNGs: liver = id 5, lung = lobes 10–14 merged by a
``label_map``.

Cases are axial slices (2D: 50 slices are enough cases to train and test a 2D U-Net on a CPU; two volumes would
give only a handful of 3D slabs). Neighbouring slices are nearly identical, so slices are grouped into 5-slice slabs
and the split is by slab (the slab is the "patient"): no slab, and so no slice's near-twin, is on two sides.
Test: 2 slabs (one with lung), validation 2, training 6; ``--fractions`` keep that share of training slabs.

Encoders: a 1-channel torchvision ResNet18 from random init, and the same trunk pre-trained (supervised, a few
epochs) on PneumoniaMNIST chest X-rays, moved into the U-Net's encoder by the weight transfer (coverage 1.0 of the
encoder; the decoder random either way). Printed: test mean Dice over slices (mean ± sd over seeds, seed 0's 95%
bootstrap CI over slices, slab-resampled), per-class Dice, and validation Dice after the first epochs.

Run: ``.venv/bin/python benchmarks/segment_real.py [--seeds 3 --epochs 20 --fractions 1 0.5 --size 64]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
from PIL import Image

from medfm.data.io import read_image
from medfm.data.profiles import Profile2D, register_profile
from medfm.data.store import store_from_arrays
from medfm.finetune.data import FinetuneData
from medfm.finetune.module import FinetuneModule
from medfm.segment.cases import align_mask, to_model_grid
from medfm.segment.data import SegmentData
from medfm.segment.module import SegmentModule
from medmnist_runs import DATA, cpu_trainer, load

TS = DATA / "totalsegmentator_example"
VOLUMES = {
    "ct": ("example_ct_sm.nii.gz", "example_seg.nii.gz"),
    "dicom": ("example_ct_dicom", "example_seg_dicom.nii.gz"),
}
CLASSES = ["liver", "lung"]
LABEL_MAP = {5: "liver", 10: "lung", 11: "lung", 12: "lung", 13: "lung", 14: "lung"}
WINDOW = (-1000.0, 400.0)
SLAB = 5
# slab → split: test holds one lung slab (ct 5: slices 25–29) and one liver-only slab; lung is trained on ct 4.
SPLITS = {("ct", 3): "val", ("ct", 5): "test", ("dicom", 0): "val", ("dicom", 2): "test"}


def write_slices(folder: Path) -> Path:
    """Axial slices of both volumes as PNG image/mask pairs; returns the manifest (slab = group, split)."""
    rows = []
    for name, (image_file, mask_file) in VOLUMES.items():
        image = read_image(TS / image_file)
        mask, note = align_mask(image, read_image(TS / mask_file))
        if note:
            print(f"{name}: {note}")
        spacing = (3.0, 3.0, image.GetSpacing()[2])
        ct = sitk.GetArrayFromImage(to_model_grid(image, spacing))
        labels = sitk.GetArrayFromImage(to_model_grid(mask, spacing, label=True)).astype(np.uint8)
        grey = np.clip((ct - WINDOW[0]) / (WINDOW[1] - WINDOW[0]) * 255, 0, 255).round().astype(np.uint8)
        for z in range(ct.shape[0]):
            Image.fromarray(grey[z]).save(folder / f"{name}_{z:02d}.png")
            Image.fromarray(labels[z]).save(folder / f"{name}_{z:02d}_seg.png")
            slab = z // SLAB
            rows.append(
                {
                    "image_path": f"{name}_{z:02d}.png",
                    "mask_path": f"{name}_{z:02d}_seg.png",
                    "slab": f"{name}-{slab}",
                    "split": SPLITS.get((name, slab), "train"),
                }
            )
    table = pd.DataFrame(rows)
    table.to_csv(folder / "slices.csv", index=False)
    return folder / "slices.csv"


def pretrain(folder: Path, epochs: int) -> Path:
    """A 1-channel ResNet18 trained to tell pneumonia from normal on PneumoniaMNIST 28² (supervised)."""
    images, labels, splits = load(DATA / "pneumoniamnist" / "pneumoniamnist_reconstructed.npz")
    store = store_from_arrays(images, folder / "pneumonia_store", (28, 28), 0, labels=labels, splits=splits)
    pl.seed_everything(0, verbose=False)
    module = FinetuneModule(task="binary", trunk="resnet18", lr_trunk=1e-3, lr_head=1e-3, patience=None,
                            n_bootstrap=10)  # fmt: skip
    data = FinetuneData(store=str(store.root), task="binary", batch_size=128)
    trainer = cpu_trainer(epochs)
    trainer.fit(module, data)
    print(
        f"pre-trained ResNet18 on PneumoniaMNIST: val AUC by epoch {[round(h['val/auroc'], 3) for h in module.history]}"
    )
    path = folder / "pneumonia_resnet18.pt"
    torch.save(module.trunk.state_dict(), path)
    return path


def segment(manifest: Path, init: str, fraction: float, seed: int, epochs: int, size: int, lr: float) -> SegmentModule:
    """One training run on the slices; the module keeps its history and test results."""
    pl.seed_everything(seed, verbose=False)
    data = SegmentData(
        str(manifest), classes=CLASSES, label_map=LABEL_MAP, profile=f"ct-slice-{size}", split_column="split",
        group_column="slab", train_fraction=fraction, fraction_seed=seed, seed=seed, samples_per_case=2,
        intensity_jitter=0.05, batch_size=8,
    )  # fmt: skip
    module = SegmentModule(
        class_names=CLASSES, encoder="resnet18", in_channels=1, decoder_channels=[128, 64, 32, 16, 16],
        init=init, min_coverage=0.99, lr_encoder=lr, lr_decoder=lr, warmup_epochs=1, patience=None,
        n_bootstrap=1000,
    )  # fmt: skip
    trainer = cpu_trainer(epochs)
    trainer.fit(module, data)
    trainer.test(module, datamodule=data, verbose=False)
    module.sizes = data.sizes()
    return module


def main() -> None:
    """Random vs pre-trained encoder × training fractions × seeds; print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    p.add_argument("--epochs", type=int, default=20, help="segmentation epochs (default 20)")
    p.add_argument("--pretrain-epochs", type=int, default=2, help="PneumoniaMNIST epochs (default 2)")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5], help="training fractions (1 0.5)")
    p.add_argument("--size", type=int, default=64, help="slice size the U-Net sees (letterboxed, default 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of encoder and decoder (3e-3)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: on a busy 2-core machine two contend; 0: all)"
    )
    p.add_argument("--shown-epochs", type=int, nargs="+", default=[1, 3, 5, 10, 20], help="epochs of the val curve")
    args = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up when the output goes to a file
    if not TS.exists():
        raise SystemExit(f"{TS} not found: this benchmark needs ../shared/data")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    register_profile(
        Profile2D(
            name=f"ct-slice-{args.size}",
            version="1",
            size=(args.size, args.size),
            resize="letterbox",
            channels=1,
            mean=(0.5,),
            std=(0.5,),
        )  # fmt: skip
    )
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = write_slices(tmp)
        weights = pretrain(tmp, args.pretrain_epochs)
        print(f"slices written and encoder pre-trained in {time.time() - start:.0f} s")
        rows = []
        for fraction in args.fractions:
            for init_name, init in (("random", "random"), ("PneumoniaMNIST", str(weights))):
                runs = []
                for seed in range(args.seeds):
                    t = time.time()
                    module = segment(manifest, init, fraction, seed, args.epochs, args.size, args.lr)
                    runs.append(module)
                    dice = module.test_results["dice"]
                    print(
                        f"  {init_name:>14} fraction {fraction:g} seed {seed}: test Dice {dice['value']:.3f} "
                        f"({dice['low']:.3f}–{dice['high']:.3f}), encoder coverage "
                        f"{module.init_report.encoder_coverage:.2f}, train slices {module.sizes['train']}, "
                        f"{time.time() - t:.0f} s"
                    )
                rows.append((init_name, fraction, runs))
    print(f"\ntotal {time.time() - start:.0f} s\n")
    shown = [e for e in args.shown_epochs if e <= args.epochs]
    print("| encoder init | train slabs | test mean Dice, mean ± sd of seeds | seed 0 (95% CI) | liver | lung | "
          f"val Dice after epochs {' / '.join(map(str, shown))} |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for init_name, fraction, runs in rows:
        values = np.array([m.test_results["dice"]["value"] for m in runs])
        first = runs[0].test_results["dice"]
        per_class = [np.mean([m.test_results[f"dice/{c}"]["value"] for m in runs]) for c in CLASSES]
        curve = [np.mean([m.history[e - 1]["val/dice"] for m in runs if len(m.history) >= e]) for e in shown]
        print(
            f"| {init_name} | {fraction:.0%} | {values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0:.3f} "
            f"| {first['value']:.3f} ({first['low']:.3f}–{first['high']:.3f}) | {per_class[0]:.3f} | "
            f"{per_class[1]:.3f} | {' / '.join(f'{v:.2f}' for v in curve)} |"
        )


if __name__ == "__main__":
    main()
