"""The detection LightningModule: a torchvision detector on a registered trunk, scored by mAP.

Training minimises the detector's own losses (Faster R-CNN: RPN objectness and box regression + box classifier
and regression; RetinaNet: focal classification + box regression). Each validation epoch logs torchmetrics'
COCO-style mAP at the IoU thresholds (default 0.40…0.75, the RSNA challenge's thresholds) as ``val/map``, plus
``val/map_50``, ``val/map_75``, ``val/mar`` and the AP of every class (``val/ap_<class>``); torchmetrics gathers the states of
every rank before computing. The best ``val/map`` weights are restored at the end of fit; the test images are
scored once, with percentile bootstrap CIs over images (:class:`medfm.detect.metrics.MatchedDetections`): the
COCO-style mAP (``map``, also ``map_40_75``) and, apart from it, the Kaggle RSNA pneumonia score (``rsna_score``).
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from medfm.detect.metrics import (
    RSNA_SCORE_THRESHOLD,
    RSNA_THRESHOLDS,
    ImageResult,
    MatchedDetections,
    map_metric,
)
from medfm.detect.model import make_detector
from medfm.errors import ConfigError
from medfm.train.callbacks import fit_callbacks
from medfm.train.optim import grouped_optimizer
from medfm.train.sampler import world

DEFAULT_INPUT = {"size": [224, 224], "channels": 1, "mean": [0.0], "std": [1.0]}


@rank_zero_only
def _say(text: str) -> None:
    print(text)


class DetectModule(pl.LightningModule):
    """Train a Faster R-CNN or RetinaNet with an FPN on any registered 2D trunk (ResNet or DenseNet family).

    Args:
        classes: the class names (``medfm detect fit`` links them from the data).
        input_spec: the input size, channels and the profile's mean/std (linked from the data as well).
        arch: ``faster_rcnn`` or ``retinanet``.
        trunk: a registered 2D trunk (``resnet18``, ``resnet50``, ``densenet121``, an exported model, …).
        init: ``random``; ``published`` (the trunk's published weights); a registered model name (its weights);
            or a checkpoint path (any layout the weight transfer reads). ``min_coverage``: least share of the
            trunk it must fill. The transfer report is printed and kept (``init_report``).
        freeze: ``none``, ``trunk``, or ``trunk-until-BLOCK`` (e.g. ``trunk-until-layer2``); frozen blocks stay in
            eval mode, so their batch-norm statistics do not drift.
        anchor_sizes: one anchor size per pyramid level (5), in pixels of the network's input;
            ``aspect_ratios``: height/width ratios of the anchors.
        fpn_channels, rpn_proposals, roi_samples, head_width, detections_per_image, score_threshold: see
            :func:`medfm.detect.model.build_detector`.
        lr_trunk, lr_head: learning rates of the trunk and of the rest (FPN, RPN, heads); warm-up + cosine per step.
        patience: early stopping on ``val/map`` (None: none). ``iou_thresholds``: of the headline mAP.
        n_bootstrap: resamples of the test CIs. rsna_score_threshold: the confidence at or above which a test
            detection counts in ``rsna_score`` (the Kaggle RSNA pneumonia score; mAP uses every detection).
    """

    def __init__(
        self,
        classes: list[str] | None = None,
        input_spec: dict | None = None,
        arch: str = "faster_rcnn",
        trunk: str = "resnet18",
        init: str = "random",
        min_coverage: float = 0.5,
        freeze: str = "none",
        anchor_sizes: list[float] | None = None,
        aspect_ratios: list[float] | None = None,
        fpn_channels: int = 256,
        rpn_proposals: int = 1000,
        roi_samples: int = 128,
        head_width: int = 256,
        detections_per_image: int = 100,
        score_threshold: float = 0.05,
        optimizer: str = "adamw",
        lr_trunk: float = 1e-4,
        lr_head: float = 1e-3,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        warmup_epochs: float = 0.0,
        final_lr_ratio: float = 0.0,
        patience: int | None = None,
        iou_thresholds: list[float] | None = None,
        n_bootstrap: int = 1000,
        rsna_score_threshold: float = RSNA_SCORE_THRESHOLD,
    ) -> None:
        super().__init__()
        if not classes:
            raise ConfigError("model.classes is empty: give the class names (`medfm detect fit` takes them from data)")
        self.save_hyperparameters()
        spec = {**DEFAULT_INPUT, **(input_spec or {})}
        self.detector, self.init_report, self.frozen = make_detector(
            arch,
            trunk,
            len(classes),
            int(spec["channels"]),
            spec["size"],
            spec["mean"],
            spec["std"],
            init=init,
            min_coverage=min_coverage,
            freeze=freeze,
            fpn_channels=fpn_channels,
            anchor_sizes=tuple(anchor_sizes or (16, 32, 64, 128, 256)),
            aspect_ratios=tuple(aspect_ratios or (0.5, 1.0, 2.0)),
            rpn_proposals=rpn_proposals,
            roi_samples=roi_samples,
            head_width=head_width,
            detections_per_image=detections_per_image,
            score_threshold=score_threshold,
        )
        if self.init_report is not None:
            _say(f"trunk init from {init}:\n{self.init_report.summary()}")
        self.thresholds = tuple(iou_thresholds or RSNA_THRESHOLDS)
        self.val_map = map_metric(self.thresholds)
        self.monitor, self.mode = "val/map", "max"
        self.history: list[dict[str, float]] = []
        self.best: dict[str, float] = {}
        self.test_results: dict[str, dict] = {}
        self.test_per_class: dict[str, dict[str, float]] = {}
        self._test_records: list[tuple[int, ImageResult]] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections (``boxes`` xyxy in input pixels, ``scores``, ``labels`` as class indices) of images."""
        outputs = self.detector(images)
        return [{**o, "labels": o["labels"] - 1} for o in outputs]

    def on_train_epoch_start(self) -> None:
        """Frozen blocks stay in eval mode: their batch-norm statistics do not drift."""
        body = self.detector.backbone.body
        for name in self.frozen:
            try:
                body.get_submodule(name).eval()
            except AttributeError:  # a block after the last tapped stage is not part of the detector
                continue

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The sum of the detector's losses on one batch."""
        losses = self.detector(batch["images"], batch["targets"])
        loss = sum(losses.values())
        n = len(batch["images"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True, batch_size=n)
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        return loss

    def _detections(self, batch: dict) -> tuple[list[dict], list[dict]]:
        preds = [
            {"boxes": o["boxes"].float(), "scores": o["scores"].float(), "labels": o["labels"]}
            for o in self(batch["images"])
        ]
        truth = [{"boxes": t["boxes"].float(), "labels": t["labels"] - 1} for t in batch["targets"]]
        return preds, truth

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Add the batch's detections to the running mAP."""
        preds, truth = self._detections(batch)
        self.val_map.update(preds, truth)

    def on_validation_epoch_end(self) -> None:
        """Log mAP (over the thresholds), mAP@0.5, mAP@0.75, recall and per-class AP; keep them in ``history``."""
        result = self.val_map.compute()
        self.val_map.reset()
        metrics = {
            "map": float(result["map"]),
            "map_50": float(result["map_50"]),
            "map_75": float(result["map_75"]),
            "mar": float(result["mar_100"]),
        }
        per_class = result["map_per_class"].reshape(-1)
        classes = result["classes"].reshape(-1)
        for k, value in zip(classes.tolist(), per_class.tolist()):
            if 0 <= k < len(self.hparams.classes):
                metrics[f"ap_{self.hparams.classes[k]}"] = float(value)
        for name, value in metrics.items():
            self.log(f"val/{name}", value, prog_bar=name == "map", sync_dist=False)
        if not self.trainer.sanity_checking:
            self.history.append({"epoch": self.current_epoch, **{f"val/{k}": v for k, v in metrics.items()}})

    def on_train_epoch_end(self) -> None:
        """Add the epoch's training loss to its row of ``history`` (validation ran just before)."""
        train_loss = self.trainer.callback_metrics.get("train/loss_epoch")
        if self.history and self.history[-1]["epoch"] == self.current_epoch and train_loss is not None:
            self.history[-1]["train/loss"] = float(train_loss)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Keep every test image's detections and true boxes (numpy) for the bootstrap."""
        preds, truth = self._detections(batch)
        for index, p, t in zip(batch["index"].tolist(), preds, truth):
            record = ImageResult(
                p["boxes"].cpu().numpy(),
                p["scores"].cpu().numpy(),
                p["labels"].cpu().numpy(),
                t["boxes"].cpu().numpy(),
                t["labels"].cpu().numpy(),
            )
            self._test_records.append((index, record))

    def on_test_epoch_end(self) -> None:
        """mAP, mAP@0.5, mAP@0.75, recall and the RSNA score of the test images with bootstrap CIs; per-class AP."""
        records = self._test_records
        self._test_records = []
        if world()[1] > 1:  # every rank scored a share of the images: gather them all
            parts: list = [None] * world()[1]
            dist.all_gather_object(parts, records)
            records = [r for part in parts for r in part]
        unique = dict(sorted(records, key=lambda r: r[0]))
        results = [unique[k] for k in sorted(unique)]
        matched = MatchedDetections(
            results,
            len(self.hparams.classes),
            self.thresholds,
            score_threshold=self.hparams.get("rsna_score_threshold", RSNA_SCORE_THRESHOLD),
        )
        self.test_results = matched.bootstrap(self.hparams.n_bootstrap, seed=0)
        self.test_results["n"] = {
            "value": float(len(results)),
            "boxes": int(sum(len(r.true_labels) for r in results)),
        }
        ap, recall = matched.per_class()
        at_50 = self.thresholds.index(0.5) if 0.5 in self.thresholds else None
        self.test_per_class = {
            name: {
                "ap": float(np.mean(ap[k])) if np.isfinite(ap[k]).all() else None,
                "ap_50": float(ap[k, at_50]) if at_50 is not None and np.isfinite(ap[k, at_50]) else None,
                "recall": float(np.mean(recall[k])) if np.isfinite(recall[k]).all() else None,
                "boxes": int(sum(int(np.sum(r.true_labels == k)) for r in results)),
            }
            for k, name in enumerate(self.hparams.classes)
        }
        for name, interval in self.test_results.items():
            if name != "n":
                self.log(f"test/{name}", float(interval["value"]), sync_dist=False)

    def configure_optimizers(self) -> dict:
        """Trunk and the rest (FPN, RPN, heads) at their own rates; warm-up + cosine stepped every step."""
        hp = self.hparams
        trunk = {id(p) for p in self.detector.backbone.body.parameters()}
        groups = [
            {
                "params": [p for p in self.detector.parameters() if p.requires_grad and id(p) in trunk],
                "lr": hp.lr_trunk,
            },
            {
                "params": [p for p in self.detector.parameters() if p.requires_grad and id(p) not in trunk],
                "lr": hp.lr_head,
            },
        ]
        return grouped_optimizer(self.trainer, groups, hp, hp.lr_head)

    def configure_callbacks(self) -> list[Callback]:
        """Best-weight restoring on ``val/map``, and early stopping when ``patience`` is set."""
        return fit_callbacks(self.monitor, self.mode, self.hparams.patience)
