"""``medfm pretrain``: LightningCLI over :class:`PretrainModule` and :class:`PretrainData`.

``medfm pretrain fit --config run.yaml [--trainer.devices 2 …]`` trains (see :mod:`medfm.train.cli` for the
defaults, ``--print_config`` and ``--ckpt_path last``); ``medfm pretrain export CKPT --name NAME`` registers the
trained trunk (:mod:`medfm.pretrain.export`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from medfm.pretrain.data import PretrainData
from medfm.pretrain.module import PretrainModule
from medfm.train.cli import MedfmCLI, launch
from medfm.train.curves import write_curves


def epoch_history(metrics_csv: Path) -> list[dict[str, float]]:
    """Per-epoch rows (``epoch``, ``train/loss``, ``val/…``) of a run's Lightning ``metrics.csv``."""
    table = pd.read_csv(metrics_csv)
    if "train/loss_epoch" in table.columns:
        table = table.rename(columns={"train/loss_epoch": "train/loss"})
    columns = [c for c in table.columns if c == "train/loss" or c.startswith("val/")]
    if "epoch" not in table.columns or not columns:
        return []
    per_epoch = table.groupby("epoch")[columns].last()  # each value is logged on its own row; last non-null
    return [{"epoch": int(epoch), **row.dropna().to_dict()} for epoch, row in per_epoch.iterrows()]


class PretrainCLI(MedfmCLI):
    """After fit: the loss (and kNN monitor) curves, and where the checkpoints went and how to export them."""

    def after_fit(self) -> None:
        """Write curves.csv/curves.png beside metrics.csv and print the checkpoint folder and the export command."""
        trainer = self.trainer
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # every rank asks (a collective under DDP)
        if not trainer.is_global_zero:
            return
        metrics = folder / "metrics.csv"
        hp = self.model.hparams
        title = f"pre-training {hp.method} · {hp.trunk} ({hp.init_weights or 'random'})"
        written = write_curves(epoch_history(metrics), folder, title) if metrics.is_file() else None
        last = folder / "checkpoints" / "last.ckpt"
        lines = [f"checkpoints in {folder / 'checkpoints'}"]
        if written:
            lines.append(f"loss curve {written[1]}")
        if last.exists():
            lines.append(f"register the trunk with `medfm pretrain export {last} --name NAME`")
        print("; ".join(lines))


def run_cli(args: list[str] | None = None) -> MedfmCLI:
    """Run ``medfm pretrain`` with LightningCLI on ``args`` (e.g. ``["fit", "--config", "run.yaml"]``)."""
    return launch(
        PretrainModule,
        PretrainData,
        args,
        "pretrain",
        cli_class=PretrainCLI,
        description="Pre-train a trunk: `fit --config run.yaml` (configs/pretrain/). "
        "Register the result with `medfm pretrain export CKPT --name NAME`.",
    )
