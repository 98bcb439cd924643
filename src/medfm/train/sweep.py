"""``medfm finetune|detect|segment sweep``: one training command run per training fraction × seed, one table."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from medfm.data.outputs import write_table


def sweep(
    config: str | os.PathLike[str],
    out: str | os.PathLike[str],
    fractions: list[float],
    runner: Callable[[list[str]], object],
    repeats: int = 3,
    extra: list[str] | None = None,
) -> pd.DataFrame:
    """Train at each training fraction × seed (``repeats`` seeds) and table the test metrics with their CIs into
    ``out/sweep.csv``. Finished runs (with a results.json) are not redone. ``runner`` runs one training command
    line (the ``run_cli`` of ``medfm finetune``, ``detect`` or ``segment``)."""
    out = Path(out)
    records = []
    for fraction in fractions:
        for seed in range(repeats):
            folder = out / f"fraction_{fraction:g}" / f"seed_{seed}"
            results = next(iter(sorted(folder.rglob("results.json"))), None)
            if results is None:
                runner(
                    [
                        "fit",
                        "--config",
                        str(config),
                        f"--seed_everything={seed}",
                        f"--data.train_fraction={fraction}",
                        f"--data.fraction_seed={seed}",
                        f"--data.seed={seed}",
                        f"--trainer.default_root_dir={folder}",
                        *(extra or []),
                    ]
                )
                results = next(iter(sorted(folder.rglob("results.json"))))
            data = json.loads(results.read_text())
            for metric, interval in data["test"].items():
                if metric == "n":
                    continue
                records.append(
                    {
                        "fraction": fraction,
                        "seed": seed,
                        "metric": metric,
                        "value": interval["value"],
                        "low": interval.get("low"),
                        "high": interval.get("high"),
                        "best_epoch": data["best"].get("epoch"),
                    }
                )
    table = pd.DataFrame(records)
    write_table(table, out / "sweep.csv")
    return table


def sweep_parser(command: str) -> argparse.ArgumentParser:
    """The arguments of ``medfm COMMAND sweep`` (finetune, detect, segment all sweep the same way)."""
    p = argparse.ArgumentParser(
        prog=f"medfm {command} sweep",
        description="train at several training fractions and seeds; one table of test metrics (sweep.csv); "
        "finished runs are kept, so the same command goes on after an interruption",
    )
    p.add_argument("--config", required=True, help=f"the task's YAML config (as for `medfm {command} fit`)")
    p.add_argument("--out", required=True, help="folder of the runs and sweep.csv")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.1], help="training fractions (1 0.1)")
    p.add_argument("--repeats", type=int, default=3, help="seeds per fraction")
    p.add_argument("extra", nargs="*", help="more overrides after --, e.g. -- --model.init=published")
    return p


def run_sweep(args: argparse.Namespace, runner: Callable[[list[str]], object]) -> pd.DataFrame:
    """Run a parsed sweep (``runner``: the command's training entry point) and print mean ± sd per metric."""
    table = sweep(args.config, args.out, args.fractions, runner, args.repeats, args.extra)
    summary = table.groupby(["metric", "fraction"])["value"].agg(["mean", "std", "count"])
    print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {Path(args.out) / 'sweep.csv'}")
    return table
