"""CPU inference speed of the 2D trunks in the zoo, against ResNet50 in the same process.

For each 2D entry: a batch of 16 random images at its profile's native size, eval mode and
``torch.inference_mode``, one warm-up batch then the median of ``--repeats`` timed batches. The timed batches
go round-robin over the models (round 1: every model once, round 2: ...), so that a change in the machine's
load during the run touches every model alike rather than whichever was being timed. Printed per entry:
images per second, parameter count, and the throughput relative to ``resnet50`` (>1: faster than ResNet50).
Weights are random (``weights=None``). Uses all of torch's CPU threads unless ``--threads`` says otherwise.
Run: ``.venv/bin/python benchmarks/extract2d_speed.py [--archs resnet18,vgg16 --repeats 3 --batch 16]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from medfm.data.profiles import get_profile
from medfm.models import create, get_entry, list_models

BASELINE = "resnet50"


def entries_2d() -> list[str]:
    """One entry per 2D network: catalogue entries (radiologynet-resnet50, ...) share their architecture's builder,
    whose own name is the shortest."""
    by_builder: dict[object, str] = {}
    for name in list_models():
        entry = get_entry(name)
        if entry.dims == 2 and len(name) < len(by_builder.get(entry.builder, name + "-")):
            by_builder[entry.builder] = name
    return sorted(by_builder.values())


def throughput(names: list[str], batch: int, repeats: int) -> dict[str, tuple[float, int, tuple[int, int]]]:
    """Per entry: images/s (median of the timed batches, after one warm-up), parameter count, input size."""
    models, inputs = {}, {}
    for name in names:
        entry = get_entry(name)
        profile = get_profile(entry.profile)
        models[name] = create(name).eval()
        generator = torch.Generator().manual_seed(0)
        inputs[name] = torch.randn(batch, profile.channels, *profile.size, generator=generator)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:  # warm-up
            out = models[name](inputs[name])
            assert out.shape == (batch, get_entry(name).feature_dim), (name, tuple(out.shape))
        for _ in range(repeats):
            for name in names:
                start = time.perf_counter()
                models[name](inputs[name])
                times[name].append(time.perf_counter() - start)
    return {
        name: (
            batch / statistics.median(times[name]),
            sum(p.numel() for p in models[name].parameters()),
            tuple(inputs[name].shape[-2:]),
        )
        for name in names
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="", help="comma-separated entry names (default: every 2D entry)")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per entry (median reported)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    available = entries_2d()
    names = [n.strip() for n in args.archs.split(",") if n.strip()] or available
    unknown = sorted(set(names) - set(available))
    if unknown:
        parser.error(f"not 2D entries: {unknown}; 2D entries: {available}")
    order = [BASELINE] + [n for n in names if n != BASELINE]  # baseline always measured, first
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {platform.processor() or platform.machine()}; "
        f"batch {args.batch}, 1 warm-up + median of {args.repeats}, eval, inference_mode"
    )
    results = throughput(order, args.batch, args.repeats)
    base = results[BASELINE][0]
    print(f"{'model':<20} {'input':>9} {'images/s':>9} {'params':>12} {'vs resnet50':>12}")
    for name in order:
        if name == BASELINE and BASELINE not in names:
            continue
        rate, params, (h, w) = results[name]
        print(f"{name:<20} {f'{h}x{w}':>9} {rate:>9.1f} {params:>12,} {rate / base:>11.2f}x")
    if BASELINE not in names:
        rate, params, (h, w) = results[BASELINE]
        print(f"{'(' + BASELINE + ')':<20} {f'{h}x{w}':>9} {rate:>9.1f} {params:>12,} {1.0:>11.2f}x")


if __name__ == "__main__":
    main()
