"""Detection metrics: hand-computed IoUs and APs, agreement with torchmetrics (COCO), and the image bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfm.detect.metrics import RSNA_THRESHOLDS, ImageResult, MatchedDetections, box_iou, map_metric

GT = np.array([[0.0, 0.0, 10.0, 10.0]])


def one(pred_box, score=0.9, label=0, truth=GT, truth_label=0) -> ImageResult:
    boxes = np.asarray(pred_box, dtype=float).reshape(-1, 4)
    return ImageResult(boxes, np.full(len(boxes), score), np.full(len(boxes), label), truth, np.array([truth_label]))


def torchmetrics_of(results: list[ImageResult]) -> dict:
    metric = map_metric(RSNA_THRESHOLDS)
    metric.update(
        [
            {
                "boxes": torch.tensor(r.boxes, dtype=torch.float32).reshape(-1, 4),
                "scores": torch.tensor(r.scores, dtype=torch.float32),
                "labels": torch.tensor(r.labels, dtype=torch.int64),
            }
            for r in results
        ],
        [
            {
                "boxes": torch.tensor(r.true_boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(r.true_labels, dtype=torch.int64),
            }
            for r in results
        ],
    )
    return {k: v for k, v in metric.compute().items()}


def test_box_iou_by_hand():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], dtype=float)
    b = np.array([[0, 0, 10, 5], [5, 0, 15, 10], [20, 20, 30, 30]], dtype=float)
    expected = np.array([[50 / 100, 50 / 150, 0.0], [0.5, 1 / 3, 0.0]])
    np.testing.assert_allclose(box_iou(a, b), expected)


@pytest.mark.parametrize(
    ("pred", "iou", "matched_thresholds"),
    [
        ([0, 0, 10, 5], 0.5, 3),  # IoU exactly 0.5: matches at 0.40, 0.45, 0.50
        ([0, 0, 10, 6], 0.6, 5),  # 0.40 … 0.60
        ([0, 0, 10, 8], 0.8, 8),  # every threshold up to 0.75
        ([0, 2, 10, 12], 8 / 12, 6),  # shifted down by 2: 80 / 120 ≥ 0.65, < 0.70
    ],
)
def test_one_box_counts_at_the_thresholds_its_iou_reaches(pred, iou, matched_thresholds):
    assert box_iou(np.array([pred], dtype=float), GT)[0, 0] == pytest.approx(iou)
    summary = MatchedDetections([one(pred)], 1).summary()
    assert summary["map"] == pytest.approx(matched_thresholds / 8)
    assert summary["map_50"] == pytest.approx(1.0 if iou >= 0.5 else 0.0)
    assert summary["map_75"] == pytest.approx(1.0 if iou >= 0.75 else 0.0)
    reference = torchmetrics_of([one(pred)])
    assert float(reference["map"]) == pytest.approx(summary["map"], abs=1e-6)
    assert float(reference["map_50"]) == pytest.approx(summary["map_50"], abs=1e-6)
    assert float(reference["map_75"]) == pytest.approx(summary["map_75"], abs=1e-6)


def test_a_higher_scoring_false_positive_halves_the_precision():
    # detections: a miss at score 0.9, then the hit at 0.8 → at recall 1 precision is 1/2 → AP 0.5 at every threshold
    image = ImageResult(
        np.array([[50, 50, 60, 60], [0, 0, 10, 10]], dtype=float), np.array([0.9, 0.8]), np.array([0, 0]), GT, [0]
    )
    matched = MatchedDetections([image], 1)
    assert matched.summary()["map"] == pytest.approx(0.5)
    assert matched.summary()["mar"] == 1.0
    # a second image with only a miss (no truth) lowers precision further: hits 1 of 3 detections above it
    background = ImageResult(
        np.array([[0, 0, 5, 5]], dtype=float), np.array([0.95]), np.array([0]), np.zeros((0, 4)), []
    )
    both = MatchedDetections([image, background], 1)
    assert both.summary()["map"] == pytest.approx(1 / 3)
    assert float(torchmetrics_of([image, background])["map"]) == pytest.approx(1 / 3, abs=1e-6)


def test_wrong_class_is_a_miss_and_classes_without_truth_are_left_out():
    hit = one([0, 0, 10, 10], label=0)
    wrong = one([0, 0, 10, 10], label=1)
    assert MatchedDetections([hit], 2).summary()["map"] == pytest.approx(
        1.0
    )  # class 1 has no true box: not averaged in
    summary = MatchedDetections([wrong], 2).summary()
    assert summary["map"] == 0.0 and summary["mar"] == 0.0


def random_results(seed: int, n: int = 40, classes: int = 3) -> list[ImageResult]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = rng.integers(0, 4)
        corner = rng.uniform(0, 60, (k, 2))
        truth = np.c_[corner, corner + rng.uniform(6, 30, (k, 2))]
        labels = rng.integers(0, classes, k)
        noisy = truth + rng.normal(0, 3, truth.shape)
        extra = rng.integers(0, 3)
        corner = rng.uniform(0, 60, (extra, 2))
        boxes = np.r_[noisy, np.c_[corner, corner + rng.uniform(6, 30, (extra, 2))]]
        boxes = np.c_[np.minimum(boxes[:, :2], boxes[:, 2:] - 1), np.maximum(boxes[:, 2:], boxes[:, :2] + 1)]
        predicted = np.r_[labels, rng.integers(0, classes, extra)]
        out.append(ImageResult(boxes, rng.uniform(0, 1, len(boxes)), predicted, truth, labels))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_torchmetrics_coco_on_random_scenes(seed):
    results = random_results(seed)
    matched = MatchedDetections(results, 3)
    mine = matched.summary()
    theirs = torchmetrics_of(results)
    for name, key in (("map", "map"), ("map_50", "map_50"), ("map_75", "map_75"), ("mar", "mar_100")):
        assert mine[name] == pytest.approx(float(theirs[key]), abs=1e-5), name
    ap, _ = matched.per_class()
    np.testing.assert_allclose(np.nanmean(ap, axis=1), theirs["map_per_class"].numpy(), atol=1e-5)


def test_a_resample_is_the_same_as_repeating_its_images():
    results = random_results(3, n=12)
    matched = MatchedDetections(results, 3)
    idx = np.array([0, 0, 0, 4, 5, 5, 7, 9, 9, 9, 11, 2])
    weighted = matched.summary(np.bincount(idx, minlength=len(results)))
    repeated = MatchedDetections([results[i] for i in np.sort(idx)], 3).summary()
    for name in weighted:
        assert weighted[name] == pytest.approx(repeated[name], abs=1e-9), name


def test_bootstrap_is_seeded_and_brackets_the_value():
    matched = MatchedDetections(random_results(4), 3)
    first = matched.bootstrap(200, seed=0)
    again = matched.bootstrap(200, seed=0)
    assert first == again
    for name, interval in first.items():
        assert interval["low"] <= interval["value"] <= interval["high"], name
        assert interval["n_resamples"] == 200
    assert first["map"]["high"] - first["map"]["low"] > 0.01  # 40 noisy images: a real spread
