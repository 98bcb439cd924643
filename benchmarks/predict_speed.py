"""``medfm predict`` with a fine-tuned 2D model: images per second at batch size 1 (one image per forward pass, as
predict ran before it batched across images) against the default batch size, in the same process.

The model is a ResNet18 trunk (1 channel, gray-224 profile) with a binary head and random weights, written as a
fine-tuned model card exactly as ``medfm finetune fit`` writes one; the images are ``--images`` PNGs of
PneumoniaMNIST (``../shared/data/pneumoniamnist``) or, when that is absent, random 28×28 grey images. Each setting
runs ``--repeats`` times, interleaved; printed: median seconds, images/s and the speed-up over batch size 1, and
the largest difference between the two settings' probabilities (they must agree).
Run: ``.venv/bin/python benchmarks/predict_speed.py [--images 128 --repeats 3 --batch 32]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from safetensors.torch import save_file

from medfm.data.profiles import get_profile
from medfm.finetune.module import mlp_head
from medfm.finetune.outputs import CARD_KIND, predict_manifest
from medfm.models import hub
from medfm.models.registry import build_trunk

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist"


def write_images(folder: Path, n: int) -> Path:
    """``n`` grey PNGs (PneumoniaMNIST's test images when present) and their manifest."""
    files = sorted(SHARED.rglob("*.npz")) if SHARED.exists() else []
    if files:
        images = np.load(files[0])["test_images"][:n]
    else:
        images = np.random.default_rng(0).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"img{i:04d}.png"
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path)
        paths.append(path.name)
    manifest = folder / "manifest.csv"
    pd.DataFrame({"image_path": paths}).to_csv(manifest, index=False)
    return manifest


def write_card(folder: Path) -> Path:
    """A fine-tuned model card (ResNet18, 1 channel, binary head) with random weights."""
    torch.manual_seed(0)
    trunk, dim = build_trunk("resnet18", 1)
    model = torch.nn.Sequential()
    model.add_module("trunk", trunk)
    model.add_module("head", mlp_head(dim, [1]))
    weights = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    profile = get_profile("gray-224")
    card = {
        "kind": CARD_KIND, "task": "binary", "classes": ["0", "1"],
        "trunk": {"name": "resnet18", "args": {}, "in_channels": 1}, "feature_dim": dim, "head": [1],
        "profile": profile.name, "profile_spec": profile.to_dict(), "margin": 0, "coords": None,
        "eval_view": None, "view_size": list(profile.size), "weights": weights.name,
        "sha256": hub.sha256_of(weights),
    }  # fmt: skip
    path = folder / "model.json"
    path.write_text(json.dumps(card))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        manifest, card = write_images(folder, args.images), write_card(folder)
        times: dict[int, list[float]] = {1: [], args.batch: []}
        tables = {}
        for _ in range(args.repeats):
            for batch in times:
                start = time.perf_counter()
                dest = predict_manifest(card, manifest, folder / f"pred{batch}.csv", batch_size=batch, device="cpu")
                times[batch].append(time.perf_counter() - start)
                tables[batch] = pd.read_csv(dest)
    base = statistics.median(times[1])
    print(f"medfm predict, fine-tuned ResNet18 (gray-224), {args.images} images, {torch.get_num_threads()} threads")
    print(f"{'batch size':>10} {'median s':>9} {'images/s':>9} {'speed-up':>9}")
    for batch, runs in times.items():
        median = statistics.median(runs)
        print(f"{batch:>10} {median:>9.2f} {args.images / median:>9.1f} {base / median:>8.2f}x")
    diff = np.abs(tables[1]["prob_1"].to_numpy() - tables[args.batch]["prob_1"].to_numpy()).max()
    print(f"largest probability difference between the two: {diff:.2e}")


if __name__ == "__main__":
    main()
