"""Detection metrics: COCO-style mAP over IoU thresholds, and its bootstrap over images.

Validation uses torchmetrics' ``MeanAveragePrecision`` (which syncs across DDP ranks). The test's confidence
intervals need mAP recomputed on a thousand resamples of the images, which COCO's evaluator is far too slow for,
so this module matches each image's boxes once, the COCO way, and then scores any resample with array arithmetic:

- per image and class, detections are taken by descending score (at most ``max_detections``); each is matched to
  the unmatched true box of highest IoU that reaches the threshold (IoU ≥ t counts), or is a false positive;
- per class, detections of all images are ranked by score; precision is made non-increasing from the right and
  read at the 101 recall points 0, 0.01, …, 1 (0 past the highest recall reached); their mean is the AP;
- mAP is the mean AP over the IoU thresholds and over the classes that have true boxes; recall is the share of
  true boxes found, averaged the same way (torchmetrics' ``mar_100``).

A resample that draws an image k times is the same as weighting its detections and true boxes by k, so the
matching is done once and each resample costs a few cumulative sums. ``tests/test_detect_metrics.py`` checks
the values against torchmetrics.

Two figures over IoU 0.40…0.75 are easily confused, and are reported under their own names:

- ``map_40_75``: the COCO-style mAP above at the IoU thresholds 0.40, 0.45, …, 0.75 (a ranking metric: no score
  threshold, precision integrated over recall);
- ``rsna_score``: the Kaggle RSNA pneumonia challenge's score. Per image, the detections scoring at least a score
  threshold are matched to the true boxes in order of confidence; at each IoU threshold t in 0.40…0.75 the image
  scores TP(t) / (TP(t) + FP(t) + FN(t)); its score is the mean over t; the figure is the mean over images. An image
  with no true box and no detection is left out; with no true box but a detection it scores 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medfm.evaluate.metrics import bootstrap_values, percentile_interval

# The IoU thresholds of the RSNA pneumonia challenge, 0.40…0.75 in steps of 0.05 (written out: COCO looks 0.5 and
# 0.75 up exactly); medfm's headline COCO-style mAP uses them too (``map_40_75``), which is not the challenge's score
RSNA_THRESHOLDS = (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)
# the default confidence at or above which a detection counts in ``rsna_score`` (the challenge scored submitted boxes)
RSNA_SCORE_THRESHOLD = 0.5
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (n, 4) with every box of ``b`` (m, 4), xyxy edges: (n, m)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


@dataclass
class ImageResult:
    """One image's predicted boxes (with scores and class indices) and true boxes, in the same pixel frame."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    true_boxes: np.ndarray
    true_labels: np.ndarray


def match_image(result: ImageResult, label: int, thresholds: Sequence[float], max_detections: int = 100) -> tuple:
    """COCO matching of one image and class: (scores (d,), true-positive flags (T, d), number of true boxes)."""
    keep = np.flatnonzero(np.asarray(result.labels) == label)
    scores = np.asarray(result.scores, dtype=np.float64)[keep]
    order = np.argsort(-scores, kind="mergesort")[:max_detections]
    boxes = np.asarray(result.boxes, dtype=np.float64).reshape(-1, 4)[keep][order]
    scores = scores[order]
    truth = np.asarray(result.true_boxes, dtype=np.float64).reshape(-1, 4)[np.asarray(result.true_labels) == label]
    tp = np.zeros((len(thresholds), len(boxes)), dtype=bool)
    if len(boxes) and len(truth):
        iou = box_iou(boxes, truth)
        for t, threshold in enumerate(thresholds):
            taken = np.zeros(len(truth), dtype=bool)
            for d in range(len(boxes)):
                best, best_iou = -1, min(threshold, 1 - 1e-10)
                for g in range(len(truth)):
                    if taken[g] or iou[d, g] < best_iou:
                        continue
                    best, best_iou = g, iou[d, g]
                if best >= 0:
                    taken[best] = True
                    tp[t, d] = True
    return scores, tp, len(truth)


class MatchedDetections:
    """Every image's detections matched once per class, scored for any weighting of the images (a resample)."""

    def __init__(
        self,
        results: Sequence[ImageResult],
        num_classes: int,
        thresholds: Sequence[float] = RSNA_THRESHOLDS,
        max_detections: int = 100,
        score_threshold: float = RSNA_SCORE_THRESHOLD,
    ) -> None:
        self.thresholds = tuple(float(t) for t in thresholds)
        self.score_threshold = float(score_threshold)
        self.n_images = len(results)
        self.classes: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        # per image, over the classes: detections kept by the score threshold, their TP at each RSNA IoU, true boxes
        kept, tp_rsna, n_truth = (
            np.zeros(len(results)),
            np.zeros((len(results), len(RSNA_THRESHOLDS))),
            np.zeros(len(results)),
        )
        for label in range(num_classes):
            scores, tps, images, truths = [], [], [], np.zeros(len(results))
            for i, result in enumerate(results):
                s, tp, n_true = match_image(result, label, self.thresholds, max_detections)
                scores.append(s)
                tps.append(tp)
                images.append(np.full(len(s), i))
                truths[i] = n_true
                if self.thresholds != RSNA_THRESHOLDS:
                    s, tp, _ = match_image(result, label, RSNA_THRESHOLDS, max_detections)
                # matching runs in descending score, so dropping the low scores afterwards changes no match above them
                above = s >= self.score_threshold
                kept[i] += above.sum()
                tp_rsna[i] += tp[:, above].sum(axis=1)
                n_truth[i] += n_true
            score = np.concatenate(scores) if scores else np.zeros(0)
            order = np.argsort(-score, kind="mergesort")  # ties keep image order, as COCO's evaluator does
            tp = np.concatenate(tps, axis=1) if tps else np.zeros((len(self.thresholds), 0), dtype=bool)
            image = np.concatenate(images).astype(int) if images else np.zeros(0, dtype=int)
            self.classes.append((score[order], tp[:, order], image[order], truths))
        counted = (kept + n_truth) > 0  # an image with neither true boxes nor detections is left out
        denominator = kept[:, None] + n_truth[:, None] - tp_rsna  # TP + FP + FN
        self.rsna_per_image = np.full(len(results), np.nan)
        self.rsna_per_image[counted] = (tp_rsna[counted] / denominator[counted]).mean(axis=1)

    def rsna_score(self, weights: np.ndarray | None = None) -> float:
        """The Kaggle RSNA pneumonia score: mean over the counted images (weighted) of their per-image score."""
        w = np.ones(self.n_images) if weights is None else np.asarray(weights, dtype=float)
        counted = np.isfinite(self.rsna_per_image)
        total = float(w[counted].sum())
        return float(np.dot(w[counted], self.rsna_per_image[counted]) / total) if total > 0 else float("nan")

    def per_class(self, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """AP and recall, (classes, thresholds), for images weighted by ``weights`` (NaN for a class without truth)."""
        w_images = np.ones(self.n_images) if weights is None else np.asarray(weights, dtype=float)
        ap = np.full((len(self.classes), len(self.thresholds)), np.nan)
        recall = np.full_like(ap, np.nan)
        for k, (_, tp, image, truths) in enumerate(self.classes):
            n_true = float(np.dot(w_images, truths))
            if n_true <= 0:
                continue
            if tp.shape[1] == 0:
                ap[k], recall[k] = 0.0, 0.0
                continue
            w = w_images[image]
            tps = np.cumsum(tp * w, axis=1)
            fps = np.cumsum((~tp) * w, axis=1)
            rec = tps / n_true
            precision = tps / (tps + fps + np.spacing(1))
            envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
            for t in range(len(self.thresholds)):
                index = np.searchsorted(rec[t], RECALL_POINTS, side="left")
                found = index < rec.shape[1]
                ap[k, t] = envelope[t, index[found]].sum() / len(RECALL_POINTS)
                recall[k, t] = rec[t, -1]
        return ap, recall

    def summary(self, weights: np.ndarray | None = None) -> dict[str, float]:
        """``map`` (all thresholds; also ``map_40_75`` when they are 0.40…0.75), ``map_50``, ``map_75``, ``mar``
        and ``rsna_score``."""
        ap, recall = self.per_class(weights)
        present = ~np.isnan(ap[:, 0])
        out = {"map": float(np.mean(ap[present])) if present.any() else float("nan")}
        if self.thresholds == RSNA_THRESHOLDS:
            out["map_40_75"] = out["map"]
        for threshold, name in ((0.5, "map_50"), (0.75, "map_75")):
            if threshold in self.thresholds:
                column = ap[present, self.thresholds.index(threshold)]
                out[name] = float(np.mean(column)) if len(column) else float("nan")
        out["mar"] = float(np.mean(recall[present])) if present.any() else float("nan")
        out["rsna_score"] = self.rsna_score(weights)
        return out

    def bootstrap(self, n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, dict]:
        """Point values with percentile bootstrap CIs over images (seeded), as plain data per metric."""
        point = self.summary()
        samples: dict[str, list[float]] = {name: [] for name in point}

        def one(idx: np.ndarray) -> float:
            for name, value in self.summary(np.bincount(idx, minlength=self.n_images)).items():
                if np.isfinite(value):
                    samples[name].append(value)
            return 0.0

        bootstrap_values(one, self.n_images, None, n_resamples, seed)
        out = {
            name: percentile_interval(v, np.asarray(samples[name]), level, n_resamples).to_dict()
            for name, v in point.items()
        }
        out["rsna_score"]["score_threshold"] = self.score_threshold
        return out


def map_metric(thresholds: Sequence[float] = RSNA_THRESHOLDS, sync: bool = True) -> object:
    """torchmetrics' MeanAveragePrecision at ``thresholds`` with per-class AP, on the faster-coco-eval backend
    (pycocotools when only that one is installed); ``sync=False``: it computes on this process's images only
    (for images already gathered from every rank)."""
    import importlib.util

    from torchmetrics.detection import MeanAveragePrecision

    backend = "faster_coco_eval" if importlib.util.find_spec("faster_coco_eval") else "pycocotools"
    return MeanAveragePrecision(
        box_format="xyxy", iou_thresholds=list(thresholds), class_metrics=True, backend=backend, sync_on_compute=sync
    )
