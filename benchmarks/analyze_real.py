"""Why do features transfer? Invariance, attentive diffusion and perceptual distance of a random vs a trained trunk.

- 2D: a 1-channel ResNet18 trained (supervised, ``medfm.finetune``) on PneumoniaMNIST chest X-rays upsampled to
  SIDE² against the same network at random init, analysed on real brain MRI slices (../shared/data/brain_tumor_mri,
  balanced over the three tumour folders) and the two NIH chest X-rays (../shared/data/chest_xray_nih), read through
  a SIDE² grey profile by ``medfm.analyze`` itself.
- 3D: a small MONAI 3D ResNet10 (widen 0.5, first-conv stride 2) trained on AdrenalMNIST3D 28³ against its random
  init, analysed on test volumes of the same set.

Printed per data set: for each transform, the mean similarity of transformed to original features (whitened
cosine and plain cosine, averaged over the transform's strengths per image, mean over images with a 95% bootstrap
CI); the attentive diffusion of the occlusion maps (and of Grad-CAM / integrated gradients of the trained head);
the perceptual distance against added Gaussian noise (mean over images, and Spearman ρ of distance with noise); and
the deep-image-prior feature loss at layer2 after 10/50/100 iterations.

Run: ``.venv/bin/python benchmarks/analyze_real.py [--sets 2d 3d --images 24 --volumes 24 --epochs-2d 2 ...]``.
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
import torch.nn.functional as F

from medfm.analyze.inputs import Inputs, open_manifest, read_inputs
from medfm.analyze.invariance import measure_model
from medfm.analyze.models import AnalysisModel
from medfm.analyze.perceptual import perceptual_distance, spearman_interval
from medfm.analyze.reconstruct import reconstruct
from medfm.analyze.saliency import attentive_diffusion, saliency_maps
from medfm.analyze.similarity import mean_interval
from medfm.analyze.transforms import Level, apply_transform, sweep
from medfm.data.profiles import Profile, Profile2D, register_profile
from medfm.data.store import store_from_arrays
from medfm.finetune.data import FinetuneData
from medfm.finetune.module import FinetuneModule
from medfm.models.registry import build_trunk
from medmnist_runs import DATA, cpu_trainer, load

NOISE = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
TRUNK_3D = {"depth": 10, "widen_factor": 0.5, "conv1_t_stride": 2}


def train(
    images: np.ndarray,
    labels: np.ndarray,
    splits: np.ndarray,
    trunk: str,
    args: dict,
    size: tuple,
    epochs: int,
    tmp: Path,
) -> FinetuneModule:
    """Supervised training of trunk + linear head through medfm.finetune (AdamW, best validation epoch kept)."""
    store = store_from_arrays(images, tmp / f"store_{trunk}", size, 2, labels=labels, splits=splits)
    pl.seed_everything(0, verbose=False)
    module = FinetuneModule(
        task="binary",
        trunk=trunk,
        trunk_args=args,
        init="random",
        lr_trunk=1e-3,
        lr_head=1e-3,
        weight_decay=1e-4,
        warmup_epochs=0.5,
        patience=None,
        class_weights="balanced",
        n_bootstrap=200,
    )
    data = FinetuneData(store=str(store.root), task="binary", batch_size=64, seed=0)
    run = cpu_trainer(epochs)
    run.fit(module, data)
    run.test(module, datamodule=data, verbose=False)
    return module.eval()


def random_trunk(trunk: str, args: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_trunk(trunk, 1, **args)[0].eval()


def invariance_table(models: list[AnalysisModel], inputs: Inputs, n_bootstrap: int) -> pd.DataFrame:
    """Per transform: mean over strengths per image, then mean over images with CI, for each model and measure."""
    levels = [lv for lv in sweep(models[0].dims) if lv.transform != "identity"]
    rows = []
    for model in models:
        per_image = measure_model(model, inputs, levels)
        per_transform = per_image.groupby(["transform", "row"], sort=False)[["mahalanobis", "cosine"]].mean()
        for transform, group in per_transform.groupby(level="transform", sort=False):
            for measure in ("mahalanobis", "cosine"):
                ci = mean_interval(group[measure].to_numpy(), n_bootstrap)
                rows.append({"transform": transform, "model": model.name, "measure": measure, "ci": ci})
    return pd.DataFrame(rows)


def print_invariance(table: pd.DataFrame, models: list[AnalysisModel]) -> None:
    names = [m.name for m in models]
    head = f"{'transform':<13}" + "".join(f"{n + ' ' + k:<38}" for n in names for k in ("whitened", "cosine"))
    print(head)
    for transform, part in table.groupby("transform", sort=False):
        cells = []
        for name in names:
            for measure in ("mahalanobis", "cosine"):
                ci = part[(part["model"] == name) & (part["measure"] == measure)]["ci"].iloc[0]
                cells.append(f"{ci.value:.3f} ({ci.low:.3f}–{ci.high:.3f})")
        print(f"{transform:<13}" + "".join(f"{c:<38}" for c in cells))


def print_saliency(models: list[AnalysisModel], inputs: Inputs, window: int, n_bootstrap: int) -> None:
    print("attentive diffusion (share of pixels above the map's mean; mean over images, 95% CI):")
    for model in models:
        values: dict[str, list[float]] = {}
        for i in range(len(inputs)):
            maps = saliency_maps(
                model, inputs.tensor(i), ("occlusion", "gradcam", "integrated_gradients"), window, steps=16
            )
            for method, saliency in maps.items():
                values.setdefault(method, []).append(attentive_diffusion(saliency))
        for method, vals in values.items():
            ci = mean_interval(np.asarray(vals), n_bootstrap)
            shown = f"{ci.value:.3f} ({ci.low:.3f}–{ci.high:.3f})"
            print(f"  {model.name:<28}{method:<22}{shown}  [{int(np.isfinite(vals).sum())} of {len(vals)} maps]")


def print_perceptual(models: list[AnalysisModel], inputs: Inputs, n_bootstrap: int) -> None:
    print("perceptual distance to the image with added Gaussian noise (std / range), mean over images:")
    print(f"  {'model':<28}" + "".join(f"{s:<9g}" for s in NOISE) + "Spearman ρ with noise (95% CI)")
    x = inputs.batch()
    for model in models:
        means, distances, levels = [], [], []
        for s in NOISE:
            noisy = torch.cat([apply_transform(x[i : i + 1], Level("noise", s), seed=i) for i in range(len(x))])
            d = perceptual_distance(model, x, noisy)
            means.append(d.mean())
            distances.extend(d)
            levels.extend([s] * len(d))
        rho = spearman_interval(np.asarray(distances), np.asarray(levels), n_bootstrap)
        cells = "".join(f"{m:<9.4f}" for m in means)
        print(f"  {model.name:<28}{cells}{rho['spearman']:.3f} ({rho['low']:.3f}–{rho['high']:.3f})")


def print_reconstruct(models: list[AnalysisModel], inputs: Inputs, iterations: int) -> None:
    shown = sorted({10, 50, iterations} & set(range(1, iterations + 1)))
    print(f"deep image prior from layer2 (relative feature loss, first image) at iterations {shown}:")
    for model in models:
        result = reconstruct(model, inputs.tensor(0), "layer2", iterations, save_at=tuple(shown))
        print(f"  {model.name:<28}" + "  ".join(f"{result.losses[k - 1]:.4f}" for k in shown))


def analyse(
    title: str, models: list[AnalysisModel], inputs: Inputs, window: int, args: argparse.Namespace, dip: int
) -> None:
    start = time.perf_counter()
    print(f"\n## {title}: {len(inputs)} inputs of shape {tuple(inputs.arrays[0].shape)}", flush=True)
    print_invariance(invariance_table(models, inputs, args.bootstrap), models)
    print_saliency(models, inputs, window, args.bootstrap)
    print_perceptual(models, inputs, args.bootstrap)
    if dip:
        print_reconstruct(models, inputs, dip)
    print(f"({time.perf_counter() - start:.0f} s)", flush=True)


def run_2d(args: argparse.Namespace, tmp: Path) -> None:
    source = DATA / "pneumoniamnist" / "pneumoniamnist_reconstructed.npz"
    mri = DATA / "brain_tumor_mri"
    if not source.exists() or not mri.exists():
        print(f"2D: data not found under {DATA}, skipped")
        return
    images, labels, splits = load(source)
    side = args.side
    keep = np.concatenate([np.flatnonzero(splits == "train")[: args.train_images], np.flatnonzero(splits != "train")])
    images, labels, splits = images[keep], labels[keep], splits[keep]
    big = F.interpolate(torch.from_numpy(images)[:, None], size=(side, side), mode="bilinear", align_corners=False)
    start = time.perf_counter()
    module = train(big[:, 0].numpy(), labels, splits, "resnet18", {}, (side - 4, side - 4), args.epochs_2d, tmp)
    auc = module.test_results["auroc"]
    print(
        f"2D: ResNet18 (1 channel) trained on {int(np.sum(splits == 'train'))} PneumoniaMNIST images at {side}² for {args.epochs_2d} epochs "
        f"({time.perf_counter() - start:.0f} s): test AUC {auc['value']:.3f} ({auc['low']:.3f}–{auc['high']:.3f})",
        flush=True,
    )
    profile = register_profile(
        Profile2D(name=f"bench-gray-{side}", version="1", size=(side, side), channels=1, mean=(0.0,), std=(1.0,))
    )
    models = [
        AnalysisModel("resnet18 random", random_trunk("resnet18", {}), profile),
        AnalysisModel("resnet18 PneumoniaMNIST", module.trunk, profile, head=module.head, card={"task": "binary"}),
    ]
    per_folder = max(1, args.images // 3)
    mri_files = [p for k in ("0", "1", "2") for p in sorted((mri / k).glob("*.jpg"))[:per_folder]]
    pd.DataFrame({"image_path": [str(p) for p in mri_files]}).to_csv(tmp / "mri.csv", index=False)
    inputs = read_inputs(open_manifest(tmp / "mri.csv", 2), models[0])
    analyse("brain tumour MRI (3 tumour types)", models, inputs, side // 8, args, args.reconstruct)
    nih = sorted((DATA / "chest_xray_nih").glob("*.png"))
    if nih:
        pd.DataFrame({"image_path": [str(p) for p in nih]}).to_csv(tmp / "nih.csv", index=False)
        nih_inputs = read_inputs(open_manifest(tmp / "nih.csv", 2), models[0])
        analyse("NIH chest X-rays", models, nih_inputs, side // 8, args, args.reconstruct)


def run_3d(args: argparse.Namespace, tmp: Path) -> None:
    source = DATA / "adrenalmnist3d" / "adrenalmnist3d.npz"
    if not source.exists():
        print(f"3D: data not found under {DATA}, skipped")
        return
    images, labels, splits = load(source)
    start = time.perf_counter()
    module = train(images, labels, splits, "resnet3d", TRUNK_3D, (24, 24, 24), args.epochs_3d, tmp)
    auc = module.test_results["auroc"]
    print(
        f"\n3D: ResNet10-3D (widen 0.5) trained on AdrenalMNIST3D 28³ for {args.epochs_3d} epochs "
        f"({time.perf_counter() - start:.0f} s): test AUC {auc['value']:.3f} ({auc['low']:.3f}–{auc['high']:.3f})",
        flush=True,
    )
    profile = Profile(
        name="bench-adrenal-28", version="1", spacing=(1.0, 1.0, 1.0), size=(28, 28, 28), hu_window=(0.0, 1.0)
    )
    models = [
        AnalysisModel("resnet10-3d random", random_trunk("resnet3d", TRUNK_3D), profile),
        AnalysisModel("resnet10-3d AdrenalMNIST3D", module.trunk, profile, head=module.head, card={"task": "binary"}),
    ]
    test = np.flatnonzero(splits == "test")[: args.volumes]
    inputs = Inputs(list(range(len(test))), [images[i][None] for i in test], pd.DataFrame({"index": test}))
    analyse("AdrenalMNIST3D test volumes (binary masks)", models, inputs, 7, args, args.reconstruct_3d)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["2d", "3d"], choices=["2d", "3d"])
    parser.add_argument("--images", type=int, default=18, help="brain MRI slices (split over the 3 folders)")
    parser.add_argument("--volumes", type=int, default=16, help="AdrenalMNIST3D test volumes")
    parser.add_argument("--side", type=int, default=48, help="2D input side (PneumoniaMNIST is upsampled to it)")
    parser.add_argument("--train-images", type=int, default=2000, help="PneumoniaMNIST training images used")
    parser.add_argument("--epochs-2d", type=int, default=2)
    parser.add_argument("--epochs-3d", type=int, default=3)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--reconstruct", type=int, default=100, help="2D DIP iterations (0: skip)")
    parser.add_argument("--reconstruct-3d", type=int, default=30, help="3D DIP iterations (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if "2d" in args.sets:
            run_2d(args, Path(tmp))
        if "3d" in args.sets:
            run_3d(args, Path(tmp))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
