"""What the real-data training benchmarks share: MedMNIST arrays, a quiet CPU Trainer, SimCLR views of small images."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPLITS = ("train", "val", "test")


def load(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images scaled to [0, 1], labels and split names of a MedMNIST npz, in split order."""
    data = np.load(path)
    images = np.concatenate([data[f"{s}_images"] for s in SPLITS]).astype(np.float32) / 255.0
    labels = np.concatenate([data[f"{s}_labels"].reshape(-1) for s in SPLITS]).astype(np.int64)
    splits = np.concatenate([[s] * len(data[f"{s}_labels"]) for s in SPLITS])
    return images, labels, splits


def cpu_trainer(epochs: int, **options) -> pl.Trainer:
    """A Trainer for in-process benchmark runs: CPU, no logs, checkpoints or progress bars (``options`` add to it)."""
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        **options,
    )


LIGHT_SKIPS = ("gaussian_smooth", "rotate", "gaussian_blur")


def ssl_view(dims: int, size: tuple[int, ...], light: bool = False) -> list[dict]:
    """The SimCLR-style training view of these small images; ``light`` leaves out blurs and rotations."""
    ops = _ssl_ops(dims, size)
    return [op for op in ops if not (light and op["op"] in LIGHT_SKIPS)]


def _ssl_ops(dims: int, size: tuple[int, ...]) -> list[dict]:
    if dims == 3:
        return [
            {"op": "random_resized_crop", "size": list(size), "scale": [0.4, 1.0]},
            {"op": "flip", "axes": [0, 1, 2], "p": 0.5},
            {"op": "intensity_jitter", "scale": 0.2, "shift": 0.1, "p": 0.8},
            {"op": "gaussian_smooth", "sigma": [0.5, 1.0], "p": 0.3},
            {"op": "gaussian_noise", "std": 0.05, "p": 0.3},
        ]
    return [
        {"op": "random_resized_crop", "size": list(size), "scale": [0.4, 1.0]},
        {"op": "flip", "axes": [1], "p": 0.5},
        {"op": "rotate", "degrees": 10, "p": 0.5},
        {"op": "brightness_contrast", "brightness": 0.4, "contrast": 0.4, "p": 0.8},
        {"op": "gaussian_blur", "sigma": [0.1, 1.0], "kernel_size": 3, "p": 0.3},
    ]
