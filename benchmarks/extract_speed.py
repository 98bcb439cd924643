"""Speed and memory of medfm's patch cutting and extraction against the published whole-volume chain.

Synthetic CT volumes of 512×512×200 voxels at 0.7×0.7×2.5 mm, several seeds each. Printed:
  * preprocessing: seconds per patch and peak memory of the FMCIB reference chain (MONAI: read, scale,
    resample the whole scan to 1 mm, reorient, crop — once per row, as its dataset does) and of medfm
    (each volume read once, only the patches sampled), each in a fresh process; and their ratios;
  * extraction: the model's own forward time on the same patches against medfm's end-to-end
    ``extract_features`` (reading, cutting and inference overlapped), and their ratio;
  * the largest |difference| between the two pipelines' patches.
Times are medians over repeats. Run: ``.venv/bin/python benchmarks/extract_speed.py [--volumes 3 --seeds 4]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from synthetic_ct import make_volumes

SIZE_XYZ = (512, 512, 200)
SPACING = (0.7, 0.7, 2.5)
SEED_BOX = ((0.23, 0.23, 0.1), (0.76, 0.76, 0.9))  # seeds inside the body, away from its edge


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reference_job(manifest: str, queue: mp.Queue) -> None:
    from medfm.data.fmcib_reference import reference_transforms

    table = pd.read_csv(manifest)
    chain = reference_transforms()
    base = _peak_rss_mb()
    times, patches = [], []
    for row in table.itertuples():
        item = {
            "image_path": str(Path(manifest).parent / row.image_path),
            "coordX": row.coordX,
            "coordY": row.coordY,
            "coordZ": row.coordZ,
        }
        start = time.perf_counter()
        out = chain(item)["image_path"].as_tensor().numpy()
        times.append(time.perf_counter() - start)
        patches.append(out)
    queue.put(
        {
            "seconds_per_patch": statistics.median(times),
            "base_mb": base,
            "peak_mb": _peak_rss_mb(),
            "patches": np.stack(patches),
        }
    )


def _medfm_job(manifest: str, repeats: int, queue: mp.Queue) -> None:
    from medfm.data.datasets import VolumePatches
    from medfm.data.manifest import read_manifest
    from medfm.data.profiles import FMCIB

    m = read_manifest(manifest)
    base = _peak_rss_mb()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        items = [VolumePatches(m, FMCIB)[i] for i in range(len(VolumePatches(m, FMCIB)))]
        times.append((time.perf_counter() - start) / len(m))
    order = np.argsort([r for item in items for r in item.rows])
    patches = np.stack([p for item in items for p in item.patches])[order]
    queue.put(
        {"seconds_per_patch": statistics.median(times), "base_mb": base, "peak_mb": _peak_rss_mb(), "patches": patches}
    )


def interpolation(manifest: Path, repeats: int) -> tuple[float, float, float]:
    """Median ms per 50³ patch: separable (three matrix products) vs point-by-point trilinear; max difference."""
    from medfm.data.io import read_volume
    from medfm.data.manifest import read_manifest
    from medfm.data.patches import plan_patch, sample_patch
    from medfm.data.profiles import FMCIB

    m = read_manifest(manifest)
    path, _, rows = m.volumes()[0]
    volume = read_volume(path)
    plans = [plan_patch(volume.geometry, m.seeds_lps[r], FMCIB) for r in rows]
    times = {True: [], False: []}
    diff = 0.0
    for _ in range(repeats):
        for plan in plans:
            out = {}
            for separable in (True, False):
                start = time.perf_counter()
                out[separable] = sample_patch(volume, plan, FMCIB, separable=separable)
                times[separable].append(time.perf_counter() - start)
            diff = max(diff, float(np.abs(out[True] - out[False]).max()))
    return 1000 * statistics.median(times[True]), 1000 * statistics.median(times[False]), diff


def run_in_child(target, *args) -> dict:
    """Run a job in a fresh process so its peak memory is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def extraction(
    manifest: Path, model: str, repeats: int, batch_size: int, workers: int | None
) -> tuple[float, float, float]:
    """Seconds to build the model once, then medians of its forward alone vs medfm's extraction (same patches)."""
    import torch

    from medfm.data.crop import crop_manifest
    from medfm.data.manifest import read_manifest
    from medfm.features.extract import FeatureRunner, extract_features
    from medfm.models.registry import load_model

    m = read_manifest(manifest)
    with tempfile.TemporaryDirectory() as tmp:
        crop = crop_manifest(m, "fmcib", tmp, progress=False)
        patches = torch.from_numpy(np.load(crop.patches))
        start = time.perf_counter()
        loaded = load_model(model, None)
        build = time.perf_counter() - start
        runner = FeatureRunner(loaded.model, device="cpu")
        runner(patches[:batch_size])  # warm-up
        forward, end_to_end = [], []
        for r in range(repeats):
            start = time.perf_counter()
            for i in range(0, len(patches), batch_size):
                runner(patches[i : i + batch_size])
            forward.append(time.perf_counter() - start)
            start = time.perf_counter()
            extract_features(
                m,
                Path(tmp) / f"f{r}.parquet",
                model=loaded,
                batch_size=batch_size,
                num_workers=workers,
                device="cpu",
                progress=False,
            )
            end_to_end.append(time.perf_counter() - start)
    return build, statistics.median(forward), statistics.median(end_to_end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="fmcib-resnet50")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=None, help="reader processes (default: medfm's choice)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_volumes(Path(tmp), args.volumes, SIZE_XYZ, SPACING, args.seeds, seed_box=SEED_BOX)
        n = args.volumes * args.seeds
        print(f"{args.volumes} volumes of {SIZE_XYZ} voxels at {SPACING} mm, {n} seeds")
        ref = run_in_child(_reference_job, str(manifest))
        ours = run_in_child(_medfm_job, str(manifest), args.repeats)
        diff = float(np.abs(ref["patches"] - ours["patches"]).max())
        print("preprocessing            s/patch   peak RSS MB   above imports MB")
        for name, r in (("reference (MONAI)", ref), ("medfm (ROI-first)", ours)):
            print(f"  {name}   {r['seconds_per_patch']:8.4f} {r['peak_mb']:12.1f} {r['peak_mb'] - r['base_mb']:18.1f}")
        print(
            f"  speed-up {ref['seconds_per_patch'] / ours['seconds_per_patch']:.1f}× (goal ≥ 20×); peak memory ratio "
            f"{ours['peak_mb'] / ref['peak_mb']:.3f} of the whole process, "
            f"{(ours['peak_mb'] - ours['base_mb']) / (ref['peak_mb'] - ref['base_mb']):.4f} of the work (goal ≤ 0.2)"
        )
        print(f"  max |reference − medfm| over all patches: {diff:.2e}")
        fast, slow, idiff = interpolation(manifest, args.repeats)
        print(
            f"interpolation of one patch: separable {fast:.1f} ms, point-by-point {slow:.1f} ms "
            f"({slow / fast:.1f}×), max |difference| {idiff:.1e}"
        )
        build, forward, total = extraction(manifest, args.model, args.repeats, args.batch_size, args.workers)
        readers = "auto" if args.workers is None else args.workers
        print(f"extraction ({args.model}, batch {args.batch_size}, reader processes: {readers}), {n} patches")
        print(f"  model build (once)  {build:8.2f} s  (not in the figures below)")
        print(f"  model forward only  {forward:8.2f} s  ({forward / n:.3f} s/patch)")
        print(f"  medfm end to end    {total:8.2f} s  ({total / n:.3f} s/patch)")
        print(f"  ratio {total / forward:.2f}× (goal ≤ 1.3×)")


if __name__ == "__main__":
    main()
