"""Callbacks every evaluated training run shares: the best validation weights restored, early stopping."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping


class BestWeights(Callback):
    """Keep a deep copy of the weights at the best validation score; put them back when fit ends."""

    def __init__(self, monitor: str, mode: str = "max") -> None:
        self.monitor = monitor
        self.mode = mode
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Copy the weights when the monitored metric improves."""
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or not torch.isfinite(value):
            return
        value = float(value)
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best, self.best_epoch = value, trainer.current_epoch
            self.state = copy.deepcopy({k: v.detach().cpu() for k, v in pl_module.state_dict().items()})

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the best weights (the last ones stay only when no epoch was validated)."""
        if self.state is not None:
            pl_module.load_state_dict(self.state)
            pl_module.best = {"epoch": self.best_epoch, self.monitor: self.best}

    def state_dict(self) -> dict:
        """Saved in checkpoints, so a resumed run keeps its best weights."""
        return {"best": self.best, "best_epoch": self.best_epoch, "state": self.state}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore from a checkpoint."""
        self.best, self.best_epoch, self.state = state_dict["best"], state_dict["best_epoch"], state_dict["state"]


def fit_callbacks(monitor: str, mode: str, patience: int | None) -> list[Callback]:
    """Best-weight restoring on ``monitor``, and early stopping on it when ``patience`` is set."""
    callbacks: list[Callback] = [BestWeights(monitor, mode)]
    if patience:
        callbacks.append(EarlyStopping(monitor, patience=patience, mode=mode, check_finite=False))
    return callbacks
