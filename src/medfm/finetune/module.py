"""The fine-tuning LightningModule: a trunk (random, published, registered or from a checkpoint) and an MLP head.

FMCIB's three supervised approaches are three ``init`` values: ``random`` (supervised from scratch), a fine-tuned
or supervised checkpoint (supervised transfer), and the foundation model (``published`` or a registered name).
``freeze`` keeps the trunk (or its blocks up to one) fixed. Tasks: binary (one logit, BCE), multiclass (softmax),
regression (MSE) and survival (Cox partial likelihood over the global batch). Validation metrics are logged every
epoch and kept in ``history``; the best weights are restored at the end of fit; the test metrics carry bootstrap
confidence intervals (the skeleton of :class:`medfm.train.task.EvaluatedTask`).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import classification_report
from torch import nn

from medfm.errors import ConfigError
from medfm.evaluate.metrics import bootstrap_values, concordance_index, percentile_interval, score
from medfm.finetune.losses import cox_loss
from medfm.models.init_weights import initialise
from medfm.models.registry import build_trunk
from medfm.models.registry import trunk_args as resolve_trunk_args
from medfm.models.stages import trunk_blocks
from medfm.train.distributed import gather
from medfm.train.freeze import freeze_blocks
from medfm.train.task import EvaluatedTask, Rows

TASKS = ("binary", "multiclass", "regression", "survival")
MONITORS = {
    "binary": ("auroc", "max"),
    "multiclass": ("auroc", "max"),
    "regression": ("mae", "min"),
    "survival": ("c_index", "max"),
}


def mlp_head(in_dim: int, widths: list[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear layers ``in_dim → widths…`` with ReLU (and dropout) between them."""
    layers: list[nn.Module] = []
    dims = [in_dim, *widths]
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 1:
            layers.append(nn.ReLU(inplace=True))
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def task_metrics(task: str, output: np.ndarray, target: np.ndarray, idx: np.ndarray | None = None) -> dict[str, float]:
    """Metrics of model outputs (probabilities, values or risks) against targets, on rows ``idx`` (all if None)."""
    if idx is not None:
        output, target = output[idx], target[idx]
    if task in ("binary", "multiclass"):
        y = target.reshape(len(target), -1)[:, 0].astype(int)
        classes = np.arange(output.shape[1])
        if len(np.unique(y)) < 2:
            return {"balanced_accuracy": score("balanced_accuracy", y, output, classes)}
        return {
            "auroc": score("roc_auc", y, output, classes),
            "average_precision": score("average_precision", y, output, classes),
            "balanced_accuracy": score("balanced_accuracy", y, output, classes),
        }
    if task == "regression":
        error = output[:, 0] - target[:, 0]
        total = np.sum((target[:, 0] - target[:, 0].mean()) ** 2)
        return {
            "mae": float(np.mean(np.abs(error))),
            "rmse": float(np.sqrt(np.mean(error**2))),
            "r2": float(1 - np.sum(error**2) / total) if total > 0 else float("nan"),
        }
    return {"c_index": concordance_index(target[:, 0], target[:, 1], output[:, 0])}


def metric_intervals(
    task: str, output: np.ndarray, target: np.ndarray, groups: np.ndarray | None = None, n_bootstrap: int = 1000
) -> dict[str, dict]:
    """Each of :func:`task_metrics` with its percentile bootstrap CI (whole patients resampled with ``groups``);
    resamples where a metric is undefined (one class only) are left out and counted."""
    point = task_metrics(task, output, target)
    samples: dict[str, list[float]] = {name: [] for name in point}

    def resample(idx: np.ndarray) -> float:
        for name, value in task_metrics(task, output, target, idx).items():
            if name in samples and np.isfinite(value):
                samples[name].append(value)
        return 0.0

    with warnings.catch_warnings():  # resamples with one class: sklearn warns, those values are left out
        warnings.simplefilter("ignore")
        bootstrap_values(resample, len(target), groups, n_bootstrap, seed=0)
    n_units = len(target) if groups is None else len(set(groups))  # below MIN_CI_N: no interval, said so
    return {
        name: percentile_interval(value, np.asarray(samples[name]), n_requested=n_bootstrap, n=n_units).to_dict()
        for name, value in point.items()
    }


class FinetuneModule(EvaluatedTask):
    """Fine-tune a trunk with an MLP head on a labelled task.

    Args:
        task: ``binary``, ``multiclass``, ``regression`` or ``survival``.
        num_classes: classes of a multiclass task.
        trunk, trunk_args, in_channels: the architecture (a registered name, or ``resnet3d`` with arguments).
        init: ``random``; ``published`` (the trunk's published weights); a registered model name (its weights,
            e.g. a ``medfm pretrain export``); or a checkpoint path (any layout the weight transfer reads, e.g. a
            pre-training or fine-tuning checkpoint). ``min_coverage``: least share of the trunk it must fill.
        freeze: ``none``, ``trunk``, or ``trunk-until-NAME`` (the trunk's children up to and including NAME,
            e.g. ``trunk-until-layer2``).
        head: widths after the trunk, the last being the output (FMCIB writes the trunk's width first:
            ``[4096, 2048, 8]``, accepted as is). Default: one linear layer.
        class_weights: ``balanced`` (inverse class frequency of the training rows) or one weight per class.
        lr_trunk, lr_head: separate learning rates of the trunk and the head.
        patience: early stopping on the validation metric (``monitor``, default by task); None: no early stop.
        optimizer, weight_decay, momentum, warmup_epochs, final_lr_ratio, n_bootstrap: as
            :class:`medfm.train.task.EvaluatedTask`.
    """

    def __init__(
        self,
        task: str = "binary",
        num_classes: int = 2,
        trunk: str = "resnet3d",
        trunk_args: dict | None = None,
        in_channels: int = 1,
        init: str = "random",
        min_coverage: float = 0.5,
        freeze: str = "none",
        head: list[int] | None = None,
        dropout: float = 0.0,
        class_weights: str | list[float] | None = None,
        lr_trunk: float = 1e-4,
        lr_head: float = 1e-3,
        patience: int | None = 10,
        monitor: str | None = None,
        **kwargs: Any,
    ) -> None:
        if task not in TASKS:
            raise ConfigError(f"task={task!r}; allowed {TASKS}")
        super().__init__(**kwargs)
        self.trunk, self.feature_dim = build_trunk(trunk, in_channels, **resolve_trunk_args(trunk, trunk_args))
        self.init_report = initialise(self.trunk, trunk, init, min_coverage)
        out_dim = num_classes if task == "multiclass" else 1
        widths = list(head or [out_dim])
        if len(widths) > 1 and widths[0] == self.feature_dim:
            widths = widths[1:]
        if widths[-1] != out_dim:
            raise ConfigError(f"head {head} must end in {out_dim} output(s) for task {task}")
        self.head = mlp_head(self.feature_dim, widths, dropout)
        self.frozen = self._freeze(freeze)
        name, mode = MONITORS[task]
        self.monitor = monitor or f"val/{name}"
        self.mode = (
            mode if monitor is None else ("min" if any(k in monitor for k in ("loss", "mae", "rmse")) else "max")
        )
        self.test_report: dict[str, object] = {}
        self._class_weights: torch.Tensor | None = None

    def _freeze(self, freeze: str) -> list[str]:
        """Freeze trunk blocks (:func:`medfm.models.stages.trunk_blocks`); returns their dotted names."""
        return freeze_blocks(self.trunk, trunk_blocks(self.trunk), freeze, "trunk")

    def trunk_module(self) -> nn.Module:
        """The trunk (``lr_trunk``; the head trains at ``lr_head``)."""
        return self.trunk

    def frozen_modules(self) -> list[nn.Module]:
        """The trunk's frozen blocks."""
        return [self.trunk.get_submodule(name) for name in self.frozen]

    def setup(self, stage: str) -> None:
        """Check the data's task is the model's; class weights from the training rows when ``balanced``."""
        data_task = getattr(getattr(self.attached_data, "hparams", None), "task", self.hparams.task)
        if data_task != self.hparams.task:
            raise ConfigError(f"model.task is {self.hparams.task!r} but data.task is {data_task!r}: set both the same")
        weights = self.hparams.class_weights
        if weights == "balanced":
            counts = torch.as_tensor(self.trainer.datamodule.class_counts(), dtype=torch.float32)
            self._class_weights = counts.sum() / (len(counts) * counts.clamp_min(1))
        elif weights is not None:
            self._class_weights = torch.as_tensor(weights, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Head outputs (logits, values or risks) of a batch."""
        return self.head(self.trunk(x))

    def predict_output(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (classification) or the raw output (regression value, survival risk)."""
        return self.to_output(self(x))

    def to_output(self, out: torch.Tensor) -> torch.Tensor:
        """Head outputs → class probabilities (classification) or as they are (regression value, survival risk)."""
        out = out.float()
        if self.hparams.task == "binary":
            p = torch.sigmoid(out[:, 0])
            return torch.stack([1 - p, p], dim=1)
        if self.hparams.task == "multiclass":
            return out.softmax(dim=1)
        return out

    def loss(self, out: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The task's loss on one batch (survival: over the batch of every rank)."""
        task = self.hparams.task
        weights = None if self._class_weights is None else self._class_weights.to(out.device)
        if task == "binary":
            y = batch["label"].float()
            pos_weight = None if weights is None else weights[1] / weights[0]
            return F.binary_cross_entropy_with_logits(out[:, 0].float(), y, pos_weight=pos_weight)
        if task == "multiclass":
            return F.cross_entropy(out.float(), batch["label"], weight=weights)
        if task == "regression":
            return F.mse_loss(out[:, 0].float(), batch["target"][:, 0])
        target = batch["target"]
        return cox_loss(gather(out[:, 0].float()), gather(target[:, 0]), gather(target[:, 1]))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One optimiser step's loss."""
        loss = self.loss(self(batch["views"][:, 0]), batch)
        self.log_train_loss(loss, len(batch["views"]))
        return loss

    def evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        """Loss, outputs (probabilities, values or risks) and targets of an evaluation batch."""
        out = self(batch["views"][:, 0])
        target = batch["target"] if "target" in batch else batch["label"][:, None].float()
        return {"index": batch["index"], "loss": self.loss(out, batch), "output": self.to_output(out), "target": target}

    def validation_metrics(self, rows: Rows) -> dict[str, float]:
        """The task's metrics (:func:`task_metrics`) of the validation rows."""
        return task_metrics(self.hparams.task, rows["output"], rows["target"])

    def test_metrics(self, rows: Rows) -> dict[str, dict]:
        """Test metrics with percentile bootstrap CIs (whole patients resampled when the data has groups);
        classification also keeps precision, recall, F1 and support per class in ``test_report``."""
        output, target, task = rows["output"], rows["target"], self.hparams.task
        groups = self.row_groups(rows.index)
        results = metric_intervals(task, output, target, groups, self.hparams.n_bootstrap)
        results["n"] = {"value": float(len(target)), "patients": None if groups is None else len(set(groups))}
        if task in ("binary", "multiclass"):
            y = target.reshape(len(target), -1)[:, 0].astype(int)
            labels = list(range(output.shape[1]))
            self.test_report = classification_report(
                y, output.argmax(axis=1), labels=labels, output_dict=True, zero_division=0
            )
        return results
