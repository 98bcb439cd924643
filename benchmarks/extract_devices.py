"""Throughput of `medfm extract` with one process against several (`--devices N`, DDP through Lightning Fabric).

Each run is the real command in a fresh process (imports and model set-up included, as a user sees it) on the same
synthetic CT volumes; wall seconds are the median of ``--repeats`` runs, and the ratio is against one process in
the same run of this script. On a CPU the fair comparison gives every layout the same cores: one process with
``--threads`` torch threads against N processes with ``threads / N`` each.

    .venv/bin/python benchmarks/extract_devices.py [--volumes 6 --seeds 4 --model fmcib-resnet50 --devices 1 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from synthetic_ct import make_volumes


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(manifest: Path, out: Path, model: str, devices: int, threads: int, batch: int) -> float:
    medfm = str(Path(sys.executable).with_name("medfm"))
    argv = [medfm, "extract", str(manifest), "--model", model, "--random-init", "--out", str(out), "--quiet"]
    argv += ["--device", "cpu", "--batch-size", str(batch), "--devices", str(devices)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(max(1, threads // devices)),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "GLOO_SOCKET_IFNAME": "lo",
    }
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"medfm extract --devices {devices} failed:\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=4, help="seeds per volume")
    parser.add_argument("--size", type=int, nargs=3, default=[256, 256, 96], help="volume size x y z")
    parser.add_argument("--model", default="fmcib-resnet50")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores shared by the processes")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="medfm_extract_devices_"))
    try:
        manifest = make_volumes(folder, args.volumes, tuple(args.size), (0.8, 0.8, 2.0), args.seeds)
        rows = len(pd.read_csv(manifest))
        print(
            f"{rows} seeds in {args.volumes} volumes of {'×'.join(map(str, args.size))}, {args.model} (random init), "
            f"batch {args.batch}, {args.threads} cores shared; median of {args.repeats} runs, fresh processes"
        )
        medians: dict[int, float] = {}
        tables = {}
        for devices in args.devices:
            times = []
            for repeat in range(args.repeats):
                out = folder / f"features_{devices}_{repeat}.parquet"
                times.append(run_once(manifest, out, args.model, devices, args.threads, args.batch))
                tables[devices] = out
            medians[devices] = statistics.median(times)
        base = medians[args.devices[0]]
        print(f"{'processes':>9}  {'threads each':>12}  {'wall s':>7}  {'rows/s':>7}  {'speed-up':>8}")
        for devices, seconds in medians.items():
            threads = max(1, args.threads // devices)
            print(f"{devices:>9}  {threads:>12}  {seconds:7.1f}  {rows / seconds:7.2f}  {base / seconds:7.2f}×")
        reference = pd.read_parquet(tables[args.devices[0]])
        features = [c for c in reference if c.startswith("feat_")]
        for devices, path in tables.items():
            diff = (pd.read_parquet(path)[features] - reference[features]).abs().to_numpy().max()
            print(f"max |features({devices} processes) − features({args.devices[0]})| = {diff:.2e}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
