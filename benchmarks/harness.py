"""What every benchmark shares: seeding, timing (median of N runs), and a JSON record of each run beside the table.

A benchmark calls :func:`seed_everything` once, times its settings with :func:`median_time` (or its own loop), and
hands its rows to :func:`report`, which prints the table and writes ``benchmarks/results/NAME-<UTC time>.json``
with the rows, the options it ran with, and the machine (Python, platform, CPU count, package versions). The
README's tables are copied from those records. Timing lives here, never as an assertion in a test.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and (when it is already imported) torch's global generators."""
    random.seed(seed)
    if "numpy" in sys.modules:
        import numpy as np

        np.random.seed(seed)
    if "torch" in sys.modules:
        import torch

        torch.manual_seed(seed)


def median_time(fn: Callable[[], object], runs: int = 5, warmup: int = 0) -> tuple[float, list[float]]:
    """(median seconds, every run's seconds) of ``fn()`` over ``runs`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def machine() -> dict[str, object]:
    """Where a benchmark ran: Python, platform, CPUs, and the versions of the packages that set its speed."""
    versions = {}
    for name in ("medfm", "torch", "monai", "numpy", "scikit-learn", "SimpleITK", "lightning"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "versions": versions,
    }


def table(rows: Sequence[dict[str, object]]) -> str:
    """A Markdown table of ``rows`` (columns in first-seen order; floats to 3 significant decimals)."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]

    def cell(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def report(
    name: str, rows: Sequence[dict[str, object]], options: dict[str, object], out_dir: Path | None = None
) -> Path:
    """Print ``rows`` as a table and write them, the options and the machine to a JSON record; returns its path."""
    print(table(rows))
    when = datetime.now(timezone.utc)
    record = {
        "benchmark": name,
        "time_utc": when.isoformat(timespec="seconds"),
        "options": options,
        "machine": machine(),
        "rows": list(rows),
    }
    folder = out_dir or RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{when.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"record: {path}")
    return path
