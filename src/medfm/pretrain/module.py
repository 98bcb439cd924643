"""The pre-training LightningModule: a trunk, a projection head and one of five objectives.

``simclr``: NT-Xent between two views of each sample. ``simclr-mined``: FMCIB's objective, each lesion view's
negatives are only the two views of the patches mined (from elsewhere in their scans) for the other samples of the
global batch. ``simclr-hardneg``: medfm's variant, SimCLR's in-batch negatives plus every mined patch (the anchor's
own sample's included). ``supcon``: supervised contrastive, views of the same label are positives. ``supervised``: cross-entropy of a linear head on the trunk's features. The contrastive
objectives share :func:`medfm.pretrain.losses.distributed_contrastive`, which gathers embeddings across ranks.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from medfm.errors import ConfigError
from medfm.models.init_weights import initialise
from medfm.models.registry import build_trunk
from medfm.models.registry import trunk_args as resolve_trunk_args
from medfm.pretrain.losses import distributed_contrastive
from medfm.pretrain.monitor import knn_scores
from medfm.train.distributed import world
from medfm.train.optim import build_optimizer, param_groups, scaled_lr, trainer_schedule

METHODS = ("simclr", "simclr-mined", "simclr-hardneg", "supcon", "supervised")
MINED = ("simclr-mined", "simclr-hardneg")


def projection_head(in_dim: int, widths: list[int], batch_norm: bool = False) -> nn.Sequential:
    """An MLP ``in_dim → widths[0] → … → widths[-1]`` with ReLU between layers (FMCIB: 4096→2048→128, no BN)."""
    layers: list[nn.Module] = []
    dims = [in_dim, *widths]
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(widths) - 1
        layers.append(nn.Linear(a, b, bias=not (batch_norm and not last)))
        if not last:
            if batch_norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def stack_views(views: torch.Tensor) -> torch.Tensor:
    """(B, V, C, …) → (V·B, C, …) ordered view by view: all first views, then all second views."""
    return views.transpose(0, 1).flatten(0, 1)


class PretrainModule(pl.LightningModule):
    """Pre-train a trunk with SimCLR, mined-negative SimCLR (FMCIB's or medfm's), SupCon or supervised cross-entropy.

    Args:
        method: one of ``simclr``, ``simclr-mined`` (FMCIB's objective), ``simclr-hardneg`` (medfm's variant),
            ``supcon``, ``supervised``.
        trunk: a registered model name (``resnet18``, ``fmcib-resnet50``, …) or ``resnet3d`` with ``trunk_args``
            (``depth`` 10/18/34/50, ``widen_factor``, ``conv1_t_stride``).
        in_channels: input channels of the trunk (1 for CT and grey images).
        init_weights: a checkpoint to start the trunk from (moved in by the weight transfer), else random.
        projection: widths of the projection head after the trunk's features.
        projection_bn: batch norm between the head's layers (SimCLR v2); FMCIB used none.
        temperature: of the contrastive loss.
        num_classes: classes of the supervised objective's head.
        optimizer: ``lars``, ``sgd``, ``adamw`` or ``adam``.
        lr: base learning rate, scaled by the global batch size with ``lr_scaling`` (``linear``: ×B/256,
            ``sqrt``, or ``none``).
        warmup_epochs: linear warm-up length before the cosine decay; the schedule steps every optimiser step.
        monitor_k: neighbours of the per-epoch kNN monitor on the validation set.
    """

    def __init__(
        self,
        method: str = "simclr",
        trunk: str = "resnet3d",
        trunk_args: dict | None = None,
        in_channels: int = 1,
        init_weights: str | None = None,
        projection: list[int] | None = None,
        projection_bn: bool = False,
        temperature: float = 0.1,
        num_classes: int | None = None,
        optimizer: str = "lars",
        lr: float = 0.3,
        lr_scaling: str = "linear",
        weight_decay: float = 1e-6,
        momentum: float = 0.9,
        warmup_epochs: float = 0.0,
        final_lr_ratio: float = 0.0,
        monitor_k: int = 20,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ConfigError(f"method={method!r}; allowed {METHODS}")
        if method == "supervised" and not num_classes:
            raise ConfigError("method supervised needs num_classes")
        self.save_hyperparameters()
        self.trunk, self.feature_dim = build_trunk(trunk, in_channels, **resolve_trunk_args(trunk, trunk_args))
        self.transfer_report = initialise(self.trunk, trunk, init_weights, min_coverage=0.0)
        if method == "supervised":
            self.head = nn.Linear(self.feature_dim, int(num_classes))
        else:
            self.head = projection_head(self.feature_dim, list(projection or [2048, 128]), projection_bn)
        self._val_features: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk features of a batch."""
        return self.trunk(x)

    def objective(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of one (per-rank) batch; contrastive losses compare against every rank's embeddings."""
        views = batch["views"]
        n_views = views.shape[1]
        labels = batch["label"].repeat(n_views)
        x = stack_views(views)
        method = self.hparams.method
        if method in ("supcon", "supervised") and bool((batch["label"] < 0).any()):
            raise ConfigError(f"method {method} needs a label for every training sample (label_column)")
        if method == "supervised":
            return F.cross_entropy(self.head(self.trunk(x)), labels)
        ids = labels if method == "supcon" else batch["index"].repeat(n_views)
        is_anchor = torch.ones(len(x), dtype=torch.bool, device=x.device)
        mined = None
        if method in MINED:
            if "negatives" not in batch:
                raise ConfigError(f"method {method} needs mined negatives: set data.mined_negatives > 0")
            negatives = stack_views(batch["negatives"])
            x = torch.cat([x, negatives])
            is_anchor = torch.cat([is_anchor, torch.zeros(len(negatives), dtype=torch.bool, device=x.device)])
            if method == "simclr-hardneg":
                ids = torch.cat([ids, torch.full((len(negatives),), -1, dtype=ids.dtype, device=ids.device)])
            else:  # FMCIB: samples are named by their slot in the global batch, a mined patch by its sample's
                rank, _ = world()
                slots = rank * len(views) + torch.arange(len(views), device=x.device)
                ids = slots.repeat(2 * n_views)
                mined = torch.arange(len(x), device=x.device) >= len(x) - len(negatives)
        z = self.head(self.trunk(x))
        return distributed_contrastive(z, ids, is_anchor, self.hparams.temperature, mined)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One optimiser step's loss, logged per step and per epoch."""
        loss = self.objective(batch)
        self.log(
            "train/loss",
            loss,
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            sync_dist=True,
            batch_size=len(batch["views"]),
        )
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Collect trunk features of the (centre-cropped) validation view for the kNN monitor."""
        self._val_features.append(self.trunk(batch["views"][:, 0]).detach().float().cpu())
        self._val_labels.append(batch["label"].detach().cpu())

    def on_validation_epoch_end(self) -> None:
        """Log leave-one-out kNN accuracy (and AUC for two classes) of the validation features."""
        if not self._val_features:
            return
        features = torch.cat(self._val_features)
        labels = torch.cat(self._val_labels)
        self._val_features.clear()
        self._val_labels.clear()
        if self.trainer.world_size > 1:
            features = self.all_gather(features.to(self.device)).flatten(0, 1).cpu()
            labels = self.all_gather(labels.to(self.device)).flatten(0, 1).cpu()
        for name, value in knn_scores(features, labels, self.hparams.monitor_k).items():
            self.log(f"val/{name}", value, prog_bar=True, rank_zero_only=True)

    def configure_optimizers(self) -> dict:
        """The optimiser on the global-batch-scaled learning rate, with warm-up + cosine stepped per step."""
        hp = self.hparams
        datamodule = getattr(self.trainer, "datamodule", None)
        batch = getattr(datamodule, "batch_size", 1) * self.trainer.world_size * self.trainer.accumulate_grad_batches
        lr = hp.lr if hp.lr_scaling == "none" else scaled_lr(hp.lr, batch, hp.lr_scaling)
        optimizer = build_optimizer(hp.optimizer, param_groups(self, hp.weight_decay), lr, hp.weight_decay, hp.momentum)
        schedule = trainer_schedule(self.trainer, optimizer, hp.warmup_epochs, hp.final_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": schedule}
