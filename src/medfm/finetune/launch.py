"""``medfm finetune``: LightningCLI over :class:`FinetuneModule` and :class:`FinetuneData`, and ``sweep``.

``medfm finetune fit --config task.yaml`` trains, restores the best validation weights, tests them once and writes
``results.json``, the curves and the model card into the run's log folder (:mod:`medfm.finetune.outputs`).
``medfm finetune sweep --config task.yaml --fractions 1 0.1 --repeats 3`` runs it per training fraction and seed
and writes one table of test metrics.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from medfm.data.outputs import write_table
from medfm.finetune.data import FinetuneData
from medfm.finetune.module import FinetuneModule
from medfm.finetune.outputs import write_run_outputs
from medfm.train.cli import EvaluatedCLI, MedfmCLI, fit_summary, launch


class FinetuneCLI(EvaluatedCLI):
    """After fit: test the restored best weights once, then write results, curves and the model card."""

    def write_outputs(self, folder: Path) -> str:
        """results.json, curves and the model card (:mod:`medfm.finetune.outputs`)."""
        return fit_summary(self.model, write_run_outputs(self.model, self.datamodule, folder))


def run_cli(args: list[str] | None = None) -> MedfmCLI:
    """Run ``medfm finetune`` with LightningCLI on ``args`` (e.g. ``["fit", "--config", "task.yaml"]``)."""
    return launch(
        FinetuneModule,
        FinetuneData,
        args,
        prog="medfm finetune",
        default_root="outputs/finetune",
        cli_class=FinetuneCLI,
        description="Fine-tune a trunk with a head: `fit --config task.yaml` (configs/finetune/). Fractions × seeds: "
        "`medfm finetune sweep --config task.yaml --out DIR --fractions 1 0.1 --repeats 3`.",
    )


def sweep(
    config: str | os.PathLike[str],
    out: str | os.PathLike[str],
    fractions: list[float],
    repeats: int = 3,
    extra: list[str] | None = None,
    runner: Callable[[list[str]], object] | None = None,
) -> pd.DataFrame:
    """Fine-tune at each training fraction × seed (``repeats`` seeds; one at fraction 1 unless asked) and table the
    test metrics with their CIs into ``out/sweep.csv``. Finished runs (with a results.json) are not redone.
    ``runner`` runs one training command line (default: ``medfm finetune``'s; ``medfm segment`` passes its own)."""
    out = Path(out)
    records = []
    for fraction in fractions:
        for seed in range(repeats):
            folder = out / f"fraction_{fraction:g}" / f"seed_{seed}"
            results = next(iter(sorted(folder.rglob("results.json"))), None)
            if results is None:
                (runner or run_cli)(
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


def run_sweep(args: argparse.Namespace, runner: Callable[[list[str]], object] | None = None) -> pd.DataFrame:
    """Run a parsed sweep (``runner``: the command's training entry point) and print mean ± sd per metric."""
    table = sweep(args.config, args.out, args.fractions, args.repeats, args.extra, runner=runner)
    summary = table.groupby(["metric", "fraction"])["value"].agg(["mean", "std", "count"])
    print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {Path(args.out) / 'sweep.csv'}")
    return table
