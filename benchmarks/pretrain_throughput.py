"""Samples per second of the pre-training data pipeline and of a training step, with and without the patch store.

Synthetic CT volumes (default 6 of 256×256×120 voxels at 0.8×0.8×2 mm, 4 seeds each) are written as .nii.gz.
Profile ``fmcib`` (50³ patches at 1 mm), margin 8, 2 mined negatives per seed, the default SimCLR view. Two ways
to serve the same training items (two views of the seed's patch, two views of one mined negative):
  * uncached: every item reads its scan and cuts the enlarged patch and the chosen negative on the fly with
    ``VolumePatches`` (one read of the scan per item). The negatives' places are drawn once beforehand, as
    ``build_store`` draws them, so both ways serve the same negatives; a negative near a border is cut
    clamp-padded here and centred in the store, which costs the same;
  * cached: ``build_store`` once (timed apart), then ``StoreViews`` over the memory-mapped store.
Printed, as samples/s with the ratio cached / uncached: the data pipeline alone (a DataLoader over ``--samples``
items, 0 workers, and ``--workers`` more when given) and a training step (``PretrainModule`` simclr-mined with a
resnet3d trunk: forward, backward, SGD step) fed by each loader; also the step alone on a batch already in
memory, which no loader can beat. Times are medians over repeats, the two ways interleaved.
With the defaults it takes about 3 minutes on 2 cores (the batch is 2 for that reason; pass ``--batch 8`` on a
bigger machine). Run: ``.venv/bin/python benchmarks/pretrain_throughput.py [--workers 2 --threads 2 --batch 8]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from synthetic_ct import make_volumes

SPACING = (0.8, 0.8, 2.0)
PROFILE = "fmcib"
MARGIN = 8
NEGATIVES = 2


class UncachedViews(Dataset):
    """The items of ``StoreViews`` (same keys, seeds and views), each cut from its scan when asked for."""

    def __init__(self, manifest, profile, margin: int, negatives: int, view, views: int = 2, seed: int = 0) -> None:
        from medfm.data.io import read_volume
        from medfm.data.manifest import Manifest
        from medfm.data.store import _far_seeds, enlarged

        self.big = enlarged(profile, margin)
        self.size = len(manifest)
        self.negatives = negatives
        self.view = view
        self.views = views
        self.seed = seed
        # Where each row's negatives lie, drawn as build_store draws them; cutting them is left to the items.
        places = np.zeros((self.size, negatives, 3))
        if negatives:
            extent = float(np.max(np.asarray(self.big.size) * np.asarray(self.big.spacing[::-1])))
            for path, uid, members in manifest.volumes():
                volume = read_volume(path, uid)
                seeds = np.asarray([manifest.seeds_lps[r] for r in members])
                for row in members:
                    rng = np.random.default_rng([seed, row])
                    places[row] = _far_seeds(volume, seeds, negatives, extent, rng)
        # One manifest to cut from: the seeds (rows 0..N-1), then the negatives of each row (N + row·K + k).
        paths = list(manifest.paths) + [manifest.paths[r] for r in range(self.size) for _ in range(negatives)]
        self.cut_from = Manifest(
            table=pd.DataFrame(index=range(len(paths))),
            source=manifest.source,
            coords="lps",
            paths=paths,
            seeds_lps=np.concatenate([np.asarray(manifest.seeds_lps, dtype=float), places.reshape(-1, 3)]),
        )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        from medfm.data.datasets import VolumePatches
        from medfm.data.training import NO_LABEL

        row, epoch = key if isinstance(key, tuple) else (key, 0)
        seeds = np.random.SeedSequence([self.seed, epoch, row]).generate_state(2 * self.views + 1)
        wanted = [row]
        if self.negatives:
            wanted.append(self.size + row * self.negatives + int(seeds[-1]) % self.negatives)
        cut = VolumePatches(self.cut_from, self.big, wanted)[0]  # the scan is read once for both patches
        if cut.errors:
            raise RuntimeError(f"row {row}: {cut.errors}")
        patch = cut.patches[0]
        item = {
            "views": torch.from_numpy(np.stack([self.view(patch, int(seeds[v])) for v in range(self.views)])),
            "index": torch.tensor(row),
            "label": torch.tensor(NO_LABEL),
        }
        if self.negatives:
            negative = cut.patches[1]
            item["negatives"] = torch.from_numpy(
                np.stack([self.view(negative, int(seeds[self.views + v])) for v in range(self.views)])
            )
        return item


def sample_keys(size: int, n: int, repeat: int) -> list[tuple[int, int]]:
    """``n`` (index, epoch) keys from shuffled epochs, fresh ones for each repeat (as training epochs draw them)."""
    from medfm.train.sampler import EpochSampler

    keys: list[tuple[int, int]] = []
    sampler = EpochSampler(size, shuffle=True, seed=0)
    epoch = 1000 * repeat
    while len(keys) < n:
        sampler.set_epoch(epoch)
        keys += list(sampler)
        epoch += 1
    return keys[:n]


def loader(dataset: Dataset, keys: list[tuple[int, int]], batch: int, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch, sampler=keys, num_workers=workers)


def train_step(module, optimizer, batch: dict[str, torch.Tensor]) -> None:
    optimizer.zero_grad(set_to_none=True)
    module.objective(batch).backward()
    optimizer.step()


def data_seconds(dataset: Dataset, n: int, batch: int, workers: int, repeat: int) -> float:
    """Seconds to draw ``n`` items through a DataLoader."""
    start = time.perf_counter()
    for _ in loader(dataset, sample_keys(len(dataset), n, repeat), batch, workers):
        pass
    return time.perf_counter() - start


def train_seconds(dataset: Dataset, module, optimizer, batch: int, steps: int, workers: int, repeat: int) -> float:
    """Seconds for ``steps`` training steps fed by a DataLoader (loader start included)."""
    start = time.perf_counter()
    for items in loader(dataset, sample_keys(len(dataset), steps * batch, repeat), batch, workers):
        train_step(module, optimizer, items)
    return time.perf_counter() - start


def folder_mb(root: Path) -> float:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    began = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=4, help="seeds per volume")
    parser.add_argument("--size", type=int, nargs=3, default=(256, 256, 120), metavar=("X", "Y", "Z"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8, help="items per data-only pass")
    parser.add_argument("--steps", type=int, default=1, help="training steps per repeat (more lets workers overlap)")
    parser.add_argument("--trunk-depth", type=int, default=10)
    parser.add_argument("--workers", type=int, default=0, help="also measure with this many loader processes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args()

    from medfm.data.augment import build_view, default_view
    from medfm.data.manifest import read_manifest
    from medfm.data.profiles import get_profile
    from medfm.data.store import build_store
    from medfm.data.training import StoreViews
    from medfm.pretrain.module import PretrainModule

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    profile = get_profile(PROFILE)
    view = build_view(default_view(3, profile.size, "ssl"), 3)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = read_manifest(
            make_volumes(Path(tmp), args.volumes, tuple(args.size), SPACING, args.seeds, suffix=".nii.gz")
        )
        n = len(manifest)
        print(
            f"{args.volumes} volumes of {tuple(args.size)} voxels at {SPACING} mm (.nii.gz), {n} seeds; profile "
            f"{PROFILE} {profile.size}, margin {MARGIN}, {NEGATIVES} mined negatives; {threads} torch threads"
        )
        start = time.perf_counter()
        store = build_store(manifest, profile, Path(tmp) / "stores", MARGIN, NEGATIVES, progress=False)
        build = time.perf_counter() - start
        start = time.perf_counter()
        uncached = UncachedViews(manifest, profile, MARGIN, NEGATIVES, view)
        mining = time.perf_counter() - start
        cached = StoreViews(store, view, mined=True)
        ways = {"uncached": uncached, "cached": cached}
        whole = build_view([{"op": "center_crop", "size": [s + 2 * MARGIN for s in profile.size]}], 3)  # identity
        raw = {
            "uncached": UncachedViews(manifest, profile, MARGIN, NEGATIVES, whole),
            "cached": StoreViews(store, whole, mined=True),
        }
        first = {name: ds[(0, 0)] for name, ds in ways.items()}  # also builds the view's transforms
        diff = float((first["uncached"]["views"] - first["cached"]["views"]).abs().max())

        module = PretrainModule(
            method="simclr-mined",
            trunk="resnet3d",
            trunk_args={"depth": args.trunk_depth},
            projection=[512, 128],
        ).train()
        optimizer = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)
        ready = next(iter(loader(cached, sample_keys(n, args.batch, 999), args.batch, 0)))
        train_step(module, optimizer, ready)  # warm-up

        workers = [0] + ([args.workers] if args.workers > 0 else [])
        data = {(w, name): [] for w in workers for name in ways}
        patches = {(0, name): [] for name in raw}
        train = {(w, name): [] for w in workers for name in ways}
        alone = []
        for r in range(args.repeats):
            for name, ds in raw.items():
                patches[0, name].append(data_seconds(ds, args.samples, args.batch, 0, r))
            for w in workers:
                for name, ds in ways.items():
                    data[w, name].append(data_seconds(ds, args.samples, args.batch, w, r))
            for w in workers:
                for name, ds in ways.items():
                    train[w, name].append(train_seconds(ds, module, optimizer, args.batch, args.steps, w, r))
            start = time.perf_counter()
            for _ in range(args.steps):
                train_step(module, optimizer, ready)
            alone.append(time.perf_counter() - start)

        print(f"store build (once)   {build:7.2f} s, {folder_mb(store.root):.1f} MB on disk ({n} patches + negatives)")
        print(f"uncached setup       {mining:7.2f} s (negatives' places drawn once; not in the figures below)")
        print(
            f"samples/s, medians of {args.repeats}; batch {args.batch}, data-only passes of {args.samples} items, "
            f"{args.steps} step(s) per training measure; resnet3d-{args.trunk_depth} simclr-mined"
        )
        print(f"  {'':26}{'uncached':>10}{'cached':>10}{'ratio':>9}")
        for label, table, count in (
            ("patches only (no views)", patches, args.samples),
            ("data only", data, args.samples),
            ("train step", train, args.steps * args.batch),
        ):
            for w in sorted({w for w, _ in table}):
                rate = {name: count / statistics.median(table[w, name]) for name in ways}
                row = f"{label}, {w} workers"
                print(
                    f"  {row:26}{rate['uncached']:10.2f}{rate['cached']:10.2f}{rate['cached'] / rate['uncached']:8.2f}×"
                )
        model_only = args.steps * args.batch / statistics.median(alone)
        print(f"  model-only step (batch in memory): {model_only:.2f} samples/s, the ceiling of the train step")
        print(f"  max |uncached − cached| over the views of one item: {diff:.1e}")
    print(f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
