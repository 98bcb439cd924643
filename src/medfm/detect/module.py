"""The detection LightningModule: a torchvision detector on a registered trunk, scored by mAP.

Training minimises the detector's own losses (Faster R-CNN: RPN objectness and box regression + box classifier
and regression; RetinaNet: focal classification + box regression). Each validation epoch logs torchmetrics'
COCO-style mAP at the IoU thresholds (default 0.40…0.75, the RSNA challenge's thresholds) as ``val/map``, plus
``val/map_50``, ``val/map_75``, ``val/mar`` and the AP of every class (``val/ap_<class>``), computed on the
detections of every rank, each image once. The best ``val/map`` weights are restored at the end of fit; the test
images are scored once, with percentile bootstrap CIs over images (:class:`medfm.detect.metrics.MatchedDetections`):
the COCO-style mAP (``map``, also ``map_40_75``) and, apart from it, the Kaggle RSNA pneumonia score
(``rsna_score``). The skeleton (gathering, history, best weights, optimiser) is
:class:`medfm.train.task.EvaluatedTask`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from medfm.detect.metrics import (
    RSNA_SCORE_THRESHOLD,
    RSNA_THRESHOLDS,
    ImageResult,
    MatchedDetections,
    map_metric,
)
from medfm.detect.model import make_detector
from medfm.errors import ConfigError
from medfm.train.task import EvaluatedTask, Rows

DEFAULT_INPUT = {"size": [224, 224], "channels": 1, "mean": [0.0], "std": [1.0]}


@rank_zero_only
def _say(text: str) -> None:
    print(text)


class DetectModule(EvaluatedTask):
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
        lr_trunk, lr_head: learning rates of the trunk and of the rest (FPN, RPN, heads).
        patience: early stopping on ``val/map`` (None: none). ``iou_thresholds``: of the headline mAP.
        rsna_score_threshold: the confidence at or above which a test detection counts in ``rsna_score`` (the
            Kaggle RSNA pneumonia score; mAP uses every detection).
        optimizer, weight_decay, momentum, warmup_epochs, final_lr_ratio, n_bootstrap: as
            :class:`medfm.train.task.EvaluatedTask`.
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
        lr_trunk: float = 1e-4,
        lr_head: float = 1e-3,
        patience: int | None = None,
        iou_thresholds: list[float] | None = None,
        rsna_score_threshold: float = RSNA_SCORE_THRESHOLD,
        **kwargs: Any,
    ) -> None:
        if not classes:
            raise ConfigError("model.classes is empty: give the class names (`medfm detect fit` takes them from data)")
        super().__init__(**kwargs)
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
        self.monitor, self.mode = "val/map", "max"
        self.test_per_class: dict[str, dict[str, float]] = {}

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections (``boxes`` xyxy in input pixels, ``scores``, ``labels`` as class indices) of images."""
        outputs = self.detector(images)
        return [{**o, "labels": o["labels"] - 1} for o in outputs]

    def trunk_module(self) -> nn.Module:
        """The trunk (``lr_trunk``; the FPN, RPN and heads train at ``lr_head``)."""
        return self.detector.backbone.body

    def frozen_modules(self) -> Iterator[nn.Module]:
        """The trunk's frozen blocks that the detector keeps (a block after the last tapped stage is not kept)."""
        for name in self.frozen:
            try:
                yield self.detector.backbone.body.get_submodule(name)
            except AttributeError:
                continue

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The sum of the detector's losses on one batch."""
        losses = self.detector(batch["images"], batch["targets"])
        loss = sum(losses.values())
        self.log_train_loss(loss, len(batch["images"]))
        for name, value in losses.items():
            self.log_train_loss(value, len(batch["images"]), f"train/{name}")
        return loss

    def evaluate(self, batch: dict, stage: str) -> dict[str, Any]:
        """Every image's detections and true boxes (numpy), for the mAP and the bootstrap."""
        truth = batch["targets"]
        images = [
            ImageResult(
                o["boxes"].float().cpu().numpy(),
                o["scores"].float().cpu().numpy(),
                o["labels"].cpu().numpy(),
                t["boxes"].float().cpu().numpy(),
                (t["labels"] - 1).cpu().numpy(),
            )
            for o, t in zip(self(batch["images"]), truth)
        ]
        return {"index": batch["index"], "image": images}

    def validation_metrics(self, rows: Rows) -> dict[str, float]:
        """torchmetrics' mAP (over the thresholds), mAP@0.5, mAP@0.75, recall and per-class AP of the images."""
        metric = map_metric(self.thresholds, sync=False)  # the rows come from every rank already
        for r in rows["image"]:
            metric.update(
                [
                    {
                        "boxes": torch.from_numpy(r.boxes),
                        "scores": torch.from_numpy(r.scores),
                        "labels": torch.from_numpy(r.labels),
                    }
                ],
                [{"boxes": torch.from_numpy(r.true_boxes), "labels": torch.from_numpy(r.true_labels)}],
            )
        result = metric.compute()
        metrics = {
            "map": float(result["map"]),
            "map_50": float(result["map_50"]),
            "map_75": float(result["map_75"]),
            "mar": float(result["mar_100"]),
        }
        for k, value in zip(result["classes"].reshape(-1).tolist(), result["map_per_class"].reshape(-1).tolist()):
            if 0 <= k < len(self.hparams.classes):
                metrics[f"ap_{self.hparams.classes[k]}"] = float(value)
        return metrics

    def test_metrics(self, rows: Rows) -> dict[str, dict]:
        """mAP, mAP@0.5, mAP@0.75, recall and the RSNA score with bootstrap CIs over images; per-class AP and
        recall (``test_per_class``)."""
        results = rows["image"]
        matched = MatchedDetections(
            results,
            len(self.hparams.classes),
            self.thresholds,
            score_threshold=self.hparams.get("rsna_score_threshold", RSNA_SCORE_THRESHOLD),
        )
        test = matched.bootstrap(self.hparams.n_bootstrap, seed=0)
        test["n"] = {"value": float(len(results)), "boxes": int(sum(len(r.true_labels) for r in results))}
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
        return test
