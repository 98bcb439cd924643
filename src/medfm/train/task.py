"""The skeleton of every evaluated training task (fine-tuning, detection, segmentation).

:class:`EvaluatedTask` holds what the tasks share: each validation or test batch's outputs are kept per row
(:meth:`EvaluatedTask.evaluate` says what a batch gives), gathered over the ranks at the end of the epoch and each
row counted once (ranks pad to equal shares, so a row may be scored twice); the task's metrics are logged and kept
per epoch in ``history``; the test metrics carry bootstrap CIs (the task's :meth:`EvaluatedTask.test_metrics`);
the best validation weights are restored at the end of fit (:class:`medfm.train.callbacks.BestWeights`), with early
stopping when ``patience`` is set; the pre-trained part and the rest train at their own learning rates (warm-up +
cosine) and frozen blocks stay in eval mode. A task keeps only what differs: its network and loss, what a batch
gives, and its metric set.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import nn

from medfm.train.callbacks import fit_callbacks
from medfm.train.optim import grouped_optimizer
from medfm.train.sampler import world


@dataclass
class Rows:
    """A stage's outputs over every rank, each row once, in row order: ``index`` (the rows), ``values`` (name →
    an array with one entry per row, or a list of per-row objects) and ``loss`` (mean over batches; None without)."""

    index: np.ndarray
    values: dict[str, Any]
    loss: float | None = None

    def __getitem__(self, name: str) -> Any:
        """The per-row values of one output."""
        return self.values[name]


def _host(value: Any) -> Any:
    """A batch output as plain data: tensors become numpy (floating ones as float32), lists stay lists."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return (value.float() if value.is_floating_point() else value).cpu().numpy()
    return list(value) if isinstance(value, (list, tuple)) else np.asarray(value)


def merge_rows(parts: list[tuple[np.ndarray, float | None, dict[str, Any]]]) -> Rows | None:
    """Join kept batches ``(index, loss, values)`` into :class:`Rows`, the first copy of each row kept (None if
    there are none)."""
    if not parts:
        return None
    index = np.concatenate([np.asarray(p[0]).reshape(-1) for p in parts])
    entries, first = np.unique(index, return_index=True)
    values: dict[str, Any] = {}
    for name in parts[0][2]:
        pieces = [p[2][name] for p in parts]
        if isinstance(pieces[0], list):
            joined = [item for piece in pieces for item in piece]
            values[name] = [joined[i] for i in first]
        else:
            values[name] = np.concatenate(pieces)[first]
    losses = [p[1] for p in parts if p[1] is not None]
    return Rows(entries, values, float(np.mean(losses)) if losses else None)


class EvaluatedTask(pl.LightningModule):
    """Base of the trained-and-evaluated tasks; the optimiser and evaluation settings every task shares.

    Args:
        optimizer, weight_decay, momentum: the optimiser (:func:`medfm.train.optim.build_optimizer`).
        warmup_epochs, final_lr_ratio: the warm-up + cosine schedule, stepped every optimiser step.
        n_bootstrap: resamples of the test metrics' confidence intervals.

    A subclass sets ``monitor``/``mode`` (the validation metric of the best weights and early stopping), keeps
    ``patience`` in its own arguments, names its two learning rates in ``lr_names`` (the pre-trained part's first)
    and implements :meth:`trunk_module`, :meth:`frozen_modules`, :meth:`evaluate`, :meth:`validation_metrics` and
    :meth:`test_metrics`.
    """

    lr_names: tuple[str, str] = ("lr_trunk", "lr_head")

    def __init__(
        self,
        optimizer: str = "adamw",
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        warmup_epochs: float = 0.0,
        final_lr_ratio: float = 0.0,
        n_bootstrap: int = 1000,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # the subclass's arguments too (Lightning collects every __init__ frame)
        self.monitor, self.mode = "val/loss", "min"
        self.history: list[dict[str, float]] = []
        self.best: dict[str, float] = {}
        self.test_results: dict[str, dict] = {}
        self.test_rows: Rows | None = None  # the gathered test rows, for the per-row test predictions
        self._kept: dict[str, list[tuple[np.ndarray, float | None, dict[str, Any]]]] = {"val": [], "test": []}

    # -- what a task says -------------------------------------------------------------------------------------
    def trunk_module(self) -> nn.Module:
        """The pre-trained part, trained at the first of ``lr_names``; every other parameter at the second."""
        raise NotImplementedError

    def frozen_modules(self) -> Iterable[nn.Module]:
        """The frozen blocks (kept in eval mode while training)."""
        return ()

    def evaluate(self, batch: Any, stage: str) -> dict[str, Any]:
        """A validation or test batch's outputs: ``index`` (its rows), optionally ``loss`` (a scalar), and per-row
        values (tensors or arrays with one entry per row, or lists of per-row objects)."""
        raise NotImplementedError

    def validation_metrics(self, rows: Rows) -> dict[str, float]:
        """The validation metrics of the gathered rows (the loss is added when the rows have one)."""
        raise NotImplementedError

    def test_metrics(self, rows: Rows) -> dict[str, dict]:
        """The test metrics of the gathered rows, each as an interval dict (``value``, ``low``, ``high`` …)."""
        raise NotImplementedError

    # -- the shared skeleton ----------------------------------------------------------------------------------
    @property
    def attached_data(self) -> pl.LightningDataModule | None:
        """The datamodule of the Trainer this module is attached to (None when it is not attached to one)."""
        try:
            trainer = self.trainer
        except RuntimeError:
            return None
        return getattr(trainer, "datamodule", None)

    def row_groups(self, index: np.ndarray) -> np.ndarray | None:
        """The patient of each row (the data's ``group_codes``), so a bootstrap resamples whole patients."""
        codes = getattr(self.attached_data, "group_codes", None)
        return None if codes is None else np.asarray(codes)[index]

    def log_train_loss(self, loss: torch.Tensor, batch_size: int, name: str = "train/loss") -> None:
        """Log a training loss per step and per epoch (averaged over the ranks)."""
        main = name == "train/loss"
        self.log(name, loss, prog_bar=main, on_step=main, on_epoch=True, sync_dist=True, batch_size=batch_size)

    def collect(self, stage: str, outputs: dict[str, Any]) -> None:
        """Keep one batch's outputs (as :meth:`evaluate` gives them) until the end of the stage's epoch."""
        values = {k: _host(v) for k, v in outputs.items() if k not in ("index", "loss")}
        loss = outputs.get("loss")
        self._kept[stage].append((_host(outputs["index"]), None if loss is None else float(loss), values))

    def gathered(self, stage: str) -> Rows | None:
        """The kept outputs of a stage over every rank, each row once (None when no rank kept any)."""
        parts, self._kept[stage] = self._kept[stage], []
        if world()[1] > 1:
            every: list = [None] * world()[1]
            dist.all_gather_object(every, parts)
            parts = [part for rank in every for part in rank]
        return merge_rows(parts)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Keep the outputs of a validation batch."""
        self.collect("val", self.evaluate(batch, "val"))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Keep the outputs of a test batch."""
        self.collect("test", self.evaluate(batch, "test"))

    def on_validation_epoch_end(self) -> None:
        """Log the validation loss and metrics; keep them in ``history`` for the curves."""
        rows = self.gathered("val")
        if rows is None:
            return
        metrics = {**({} if rows.loss is None else {"loss": rows.loss}), **self.validation_metrics(rows)}
        shown = ("loss", self.monitor.split("/")[-1])
        for name, value in metrics.items():
            self.log(f"val/{name}", float(value), prog_bar=name in shown)
        if not self.trainer.sanity_checking:
            self.history.append({"epoch": self.current_epoch, **{f"val/{k}": float(v) for k, v in metrics.items()}})

    def on_train_epoch_start(self) -> None:
        """Frozen blocks stay in eval mode: their batch-norm statistics do not drift."""
        for module in self.frozen_modules():
            module.eval()

    def on_train_epoch_end(self) -> None:
        """Add the epoch's training loss to its row of ``history`` (validation ran just before)."""
        train_loss = self.trainer.callback_metrics.get("train/loss_epoch")
        if self.history and self.history[-1]["epoch"] == self.current_epoch and train_loss is not None:
            self.history[-1]["train/loss"] = float(train_loss)

    def on_test_epoch_end(self) -> None:
        """The test metrics with their bootstrap CIs into ``test_results`` (and the log)."""
        rows = self.gathered("test")
        if rows is None:
            return
        self.test_rows = rows
        self.test_results = self.test_metrics(rows)
        for name, interval in self.test_results.items():
            if name != "n" and interval.get("value") is not None:
                self.log(f"test/{name}", float(interval["value"]))

    def configure_optimizers(self) -> dict:
        """The pre-trained part and the rest at their own learning rates; warm-up + cosine every optimiser step."""
        hp = self.hparams
        lr_trunk, lr_rest = (hp[name] for name in self.lr_names)
        trunk = {id(p) for p in self.trunk_module().parameters()}
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if id(p) in trunk], "lr": lr_trunk},
            {"params": [p for p in params if id(p) not in trunk], "lr": lr_rest},
        ]
        return grouped_optimizer(self.trainer, groups, hp, lr_rest)

    def configure_callbacks(self) -> list[Callback]:
        """Best-weight restoring on ``monitor``, and early stopping on it when ``patience`` is set."""
        return fit_callbacks(self.monitor, self.mode, self.hparams.patience)
