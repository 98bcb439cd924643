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


# -- the Kaggle RSNA pneumonia score, apart from the COCO-style mAP ------------------------------------------------
def image(pred_boxes, scores, true_boxes) -> ImageResult:
    boxes = np.asarray(pred_boxes, dtype=float).reshape(-1, 4)
    truth = np.asarray(true_boxes, dtype=float).reshape(-1, 4)
    return ImageResult(boxes, np.asarray(scores, dtype=float), np.zeros(len(boxes), int), truth, np.zeros(len(truth)))


def rsna_images() -> list[ImageResult]:
    return [
        # A: a perfect box (0.9), a stray box (0.8) and a low-confidence box (0.3, under the 0.5 threshold)
        image([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 5]], [0.9, 0.8, 0.3], GT),
        # B: one box of IoU 0.62 (62 / 100): a TP at 0.40 … 0.60, at 0.65 … 0.75 a FP and a FN
        image([[0, 0, 10, 6.2]], [0.7], GT),
        # C: no true box, a detection above the threshold: scores 0 and is counted
        image([[0, 0, 5, 5]], [0.6], []),
        # D: no true box, a detection under the threshold only: nothing left, the image is left out
        image([[0, 0, 5, 5]], [0.2], []),
        # E: two true boxes, no detection: two FN, scores 0
        image([], [], [[0, 0, 10, 10], [20, 20, 30, 30]]),
        # F: nothing at all: left out
        image([], [], []),
    ]


def test_rsna_score_by_hand():
    # per image, mean over the 8 IoU thresholds of TP / (TP + FP + FN):
    a = 1 / (1 + 1 + 0)  # at every threshold: TP 1, FP 1 (the stray box), FN 0; the 0.3 box does not count
    b = (5 * 1 / 1 + 3 * 0 / (0 + 1 + 1)) / 8  # TP at 5 thresholds; FP + FN at the other 3
    c, e = 0.0, 0.0
    expected = (a + b + c + e) / 4  # D and F are left out
    assert expected == pytest.approx(0.28125)
    matched = MatchedDetections(rsna_images(), 1)
    assert matched.rsna_score() == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(matched.rsna_per_image, [a, b, c, np.nan, e, np.nan], atol=1e-12)
    summary = matched.summary()
    assert summary["rsna_score"] == pytest.approx(expected, abs=1e-12)
    assert summary["map_40_75"] == summary["map"]  # the COCO-style figure, a different number
    assert abs(summary["map"] - expected) > 0.05
    # the image-weighted form (a resample drawing A twice) by hand
    weights = np.array([2, 1, 1, 1, 1, 1])
    assert matched.rsna_score(weights) == pytest.approx((2 * a + b + c + e) / 5, abs=1e-12)
    # a lower score threshold lets the 0.3 box into A (a second FP, 1/3) and D's box (a counted 0)
    low = MatchedDetections(rsna_images(), 1, score_threshold=0.1)
    assert low.rsna_score() == pytest.approx((1 / 3 + b + c + 0.0 + e) / 5, abs=1e-12)


def test_rsna_score_pools_classes_within_an_image_and_uses_its_own_thresholds():
    # class 1's box does not match class 0's truth: one FP and one FN at every threshold
    wrong_class = ImageResult(GT.copy(), np.array([0.9]), np.array([1]), GT.copy(), np.array([0]))
    right = one([0, 0, 10, 10])
    assert MatchedDetections([wrong_class, right], 2).rsna_score() == pytest.approx((0.0 + 1.0) / 2)
    # with other IoU thresholds for the mAP, the RSNA score still sweeps 0.40 … 0.75
    custom = MatchedDetections(rsna_images(), 1, thresholds=(0.5,))
    assert custom.rsna_score() == pytest.approx(0.28125, abs=1e-12)
    assert "map_40_75" not in custom.summary()


def test_rsna_score_bootstrap_has_a_ci_and_its_threshold():
    results = rsna_images() * 5
    ci = MatchedDetections(results, 1).bootstrap(300, seed=1)
    rsna = ci["rsna_score"]
    assert rsna["value"] == pytest.approx(0.28125, abs=1e-12)
    assert rsna["low"] < rsna["value"] < rsna["high"]
    assert rsna["score_threshold"] == 0.5
    assert ci["map_40_75"] == ci["map"]
