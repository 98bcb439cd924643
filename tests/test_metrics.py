"""Metrics of predictions: sklearn agreement, bootstrap CIs (plain, grouped, paired) and DeLong's test."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    roc_auc_score,
)
from sklearn.preprocessing import label_binarize

from medfm.evaluate.metrics import (
    METRICS,
    _resample_indices,
    bootstrap_ci,
    check_metric,
    delong_test,
    paired_bootstrap,
    score,
)


def _binary(n: int = 120, seed: int = 0, signal: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Binary labels and (n, 2) probabilities whose positive column carries ``signal``."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(size=n))))
    return y, np.c_[1 - p, p]


def _multiclass(n: int = 150, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    e = np.exp(logits)
    return y, e / e.sum(axis=1, keepdims=True)


# -- score ---------------------------------------------------------------------------------------------------
def test_score_binary_matches_sklearn():
    y, proba = _binary()
    assert score("roc_auc", y, proba) == pytest.approx(roc_auc_score(y, proba[:, 1]), abs=1e-12)
    assert score("average_precision", y, proba) == pytest.approx(average_precision_score(y, proba[:, 1]), abs=1e-12)
    predicted = (proba[:, 1] > 0.5).astype(int)
    assert score("accuracy", y, proba) == pytest.approx(accuracy_score(y, predicted), abs=1e-12)
    assert score("balanced_accuracy", y, proba) == pytest.approx(balanced_accuracy_score(y, predicted), abs=1e-12)
    # the AUC is informative here, not a degenerate value
    assert 0.6 < score("roc_auc", y, proba) < 0.99


def test_score_binary_string_classes_reads_last_column_as_positive():
    y, proba = _binary(seed=3)
    labels = np.array(["benign", "malignant"])[y]
    auc = score("roc_auc", labels, proba, classes=np.array(["benign", "malignant"]))
    assert auc == pytest.approx(roc_auc_score(y, proba[:, 1]), abs=1e-12)
    # swapping the columns' meaning flips the AUC
    flipped = score("roc_auc", labels, proba[:, ::-1], classes=np.array(["benign", "malignant"]))
    assert flipped == pytest.approx(1 - auc, abs=1e-12)


def test_score_multiclass_matches_sklearn():
    y, proba = _multiclass()
    expected_auc = roc_auc_score(y, proba, multi_class="ovr", average="macro")
    expected_ap = average_precision_score(label_binarize(y, classes=np.arange(4)), proba, average="macro")
    assert score("roc_auc", y, proba) == pytest.approx(expected_auc, abs=1e-12)
    assert score("average_precision", y, proba) == pytest.approx(expected_ap, abs=1e-12)
    assert score("accuracy", y, proba) == pytest.approx(accuracy_score(y, proba.argmax(axis=1)), abs=1e-12)
    assert score("balanced_accuracy", y, proba) == pytest.approx(
        balanced_accuracy_score(y, proba.argmax(axis=1)), abs=1e-12
    )


def test_score_multiclass_with_label_values():
    y, proba = _multiclass(seed=5)
    classes = np.array([10, 20, 30, 40])
    assert score("roc_auc", classes[y], proba, classes) == pytest.approx(
        roc_auc_score(y, proba, multi_class="ovr", average="macro"), abs=1e-12
    )
    assert score("accuracy", classes[y], proba, classes) == pytest.approx(
        accuracy_score(y, proba.argmax(axis=1)), abs=1e-12
    )


def test_auc_of_separable_scores_is_one():
    y = np.array([0] * 30 + [1] * 20)
    p = np.r_[np.linspace(0.0, 0.4, 30), np.linspace(0.6, 1.0, 20)]
    proba = np.c_[1 - p, p]
    assert score("roc_auc", y, proba) == 1.0
    assert score("average_precision", y, proba) == 1.0
    assert score("accuracy", y, proba) == 1.0
    assert score("roc_auc", y, proba[:, ::-1]) == 0.0


def test_check_metric_names_allowed_values():
    assert check_metric("roc_auc") == "roc_auc"
    with pytest.raises(ValueError, match="allowed") as info:
        check_metric("f1")
    for name in METRICS:
        assert name in str(info.value)


# -- bootstrap -----------------------------------------------------------------------------------------------
def test_bootstrap_ci_is_seeded():
    y, proba = _binary(n=80, seed=1)
    a = bootstrap_ci("roc_auc", y, proba, n_resamples=200, seed=7)
    b = bootstrap_ci("roc_auc", y, proba, n_resamples=200, seed=7)
    c = bootstrap_ci("roc_auc", y, proba, n_resamples=200, seed=8)
    assert (a.low, a.high) == (b.low, b.high)
    assert (a.low, a.high) != (c.low, c.high)
    assert a.value == c.value == pytest.approx(roc_auc_score(y, proba[:, 1]), abs=1e-12)
    assert a.low < a.value < a.high
    assert a.n_resamples == 200
    assert a.level == 0.95
    assert a.to_dict() == {
        "value": a.value,
        "low": a.low,
        "high": a.high,
        "level": 0.95,
        "n_resamples": 200,
        "n_dropped": 0,
        "n": 80,
    }
    assert str(a).startswith(f"{a.value:.3f} (95% CI ")


def test_bootstrap_ci_of_random_scores_contains_half():
    rng = np.random.default_rng(42)
    y = rng.integers(0, 2, 200)
    p = rng.random(200)
    ci = bootstrap_ci("roc_auc", y, np.c_[1 - p, p], n_resamples=200, seed=0)
    assert ci.low < 0.5 < ci.high
    assert ci.high - ci.low < 0.25  # an interval, not everything


def test_bootstrap_level_widens_interval():
    y, proba = _binary(n=80, seed=2)
    narrow = bootstrap_ci("roc_auc", y, proba, n_resamples=200, level=0.5, seed=0)
    wide = bootstrap_ci("roc_auc", y, proba, n_resamples=200, level=0.95, seed=0)
    assert wide.low < narrow.low < narrow.high < wide.high


def test_bootstrap_skips_one_class_resamples():
    y = np.array([0] * 11 + [1])
    p = np.linspace(0, 1, 12)
    ci = bootstrap_ci("roc_auc", y, np.c_[1 - p, p], n_resamples=200, seed=0)
    # P(no positive in a resample of 12) = (11/12)^12 ≈ 0.35: about a third are skipped
    assert 100 < ci.n_resamples < 170
    assert ci.value == 1.0


def test_resample_indices_keeps_groups_whole():
    groups = np.repeat(np.array(["p3", "p1", "p7", "p2", "p9"]), [1, 2, 3, 4, 5])
    rng = np.random.default_rng(0)
    sizes = {g: int(np.sum(groups == g)) for g in np.unique(groups)}
    for _ in range(50):
        idx = _resample_indices(len(groups), groups, rng)
        chosen = groups[idx]
        # every group drawn c times contributes exactly c × (its size) rows, and each member c times
        for g, size in sizes.items():
            members = np.flatnonzero(groups == g)
            counts = np.array([np.sum(idx == m) for m in members])
            assert np.all(counts == counts[0])
            assert np.sum(chosen == g) == counts[0] * size
        # as many groups are drawn as there are groups
        assert sum(np.sum(chosen == g) // s for g, s in sizes.items()) == len(sizes)


def test_resample_indices_plain_is_row_bootstrap():
    rng = np.random.default_rng(3)
    idx = _resample_indices(50, None, rng)
    assert idx.shape == (50,)
    assert idx.min() >= 0 and idx.max() < 50
    assert len(np.unique(idx)) < 50  # with replacement


def test_grouped_bootstrap_is_wider_with_duplicated_rows():
    # 30 patients, 10 identical rows each: the rows are not independent, only the patients are
    y_patient, proba_patient = _binary(n=30, seed=11, signal=0.8)
    y = np.repeat(y_patient, 10)
    proba = np.repeat(proba_patient, 10, axis=0)
    groups = np.repeat(np.arange(30), 10)
    plain = bootstrap_ci("roc_auc", y, proba, n_resamples=200, seed=0)
    grouped = bootstrap_ci("roc_auc", y, proba, groups=groups, n_resamples=200, seed=0)
    per_patient = bootstrap_ci("roc_auc", y_patient, proba_patient, n_resamples=200, seed=0)
    assert plain.value == grouped.value == pytest.approx(per_patient.value, abs=1e-12)
    plain_width, grouped_width = plain.high - plain.low, grouped.high - grouped.low
    assert grouped_width > 2 * plain_width  # ≈ √10 wider
    # the grouped interval is about as wide as that of the 30 patients alone
    assert grouped_width == pytest.approx(per_patient.high - per_patient.low, rel=0.35)


# -- paired bootstrap ------------------------------------------------------------------------------------
def test_paired_bootstrap_of_model_with_itself_is_zero():
    y, proba = _binary(n=80, seed=4)
    result = paired_bootstrap("roc_auc", y, proba, proba, n_resamples=200, seed=0)
    diff = result.difference
    assert (diff.value, diff.low, diff.high) == (0.0, 0.0, 0.0)
    assert (result.p_value, result.p_below, result.p_text) == (1.0, False, "p = 1")
    assert diff.n_resamples == 200 and diff.n_dropped == 0


def test_paired_bootstrap_good_beats_noise():
    y, good = _binary(n=100, seed=5, signal=2.0)
    rng = np.random.default_rng(9)
    noise = rng.random(100)
    bad = np.c_[1 - noise, noise]
    result = paired_bootstrap("roc_auc", y, good, bad, n_resamples=200, seed=0)
    diff = result.difference
    expected = roc_auc_score(y, good[:, 1]) - roc_auc_score(y, noise)
    assert diff.value == pytest.approx(expected, abs=1e-12)
    assert 0 < diff.low < diff.value < diff.high
    # not one of the 200 resamples lies at or below zero: p is bounded by 2/B, never reported as 0
    assert diff.low > 0
    assert (result.p_value, result.p_below, result.p_text) == (2 / 200, True, "p < 0.01")
    reverse = paired_bootstrap("roc_auc", y, bad, good, n_resamples=200, seed=0)
    assert reverse.difference.value == pytest.approx(-diff.value, abs=1e-12)
    assert reverse.difference.high < 0
    assert (reverse.p_value, reverse.p_below) == (result.p_value, True)


def test_paired_bootstrap_p_counts_the_other_side():
    y, a = _binary(n=60, seed=6, signal=0.8)
    _, b = _binary(n=60, seed=6, signal=0.6)
    rng = np.random.default_rng(1)
    b = np.clip(b + rng.normal(scale=0.2, size=b.shape), 0.01, 0.99)
    result = paired_bootstrap("roc_auc", y, a, b, n_resamples=300, seed=3)
    # the same resamples, drawn again here, and the two-sided p from their differences
    rng = np.random.default_rng(3)
    diffs = []
    for _ in range(300):
        idx = _resample_indices(len(y), None, rng)
        if len(np.unique(y[idx])) > 1:
            diffs.append(roc_auc_score(y[idx], a[idx, 1]) - roc_auc_score(y[idx], b[idx, 1]))
    diffs = np.asarray(diffs)
    expected = 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0))
    assert 0 < expected < 1  # both sides are populated here
    assert result.p_value == pytest.approx(expected, abs=1e-12) and not result.p_below


def test_dropped_resamples_are_counted_and_noted():
    # one positive among 12 rows: about (11/12)^12 ≈ 35% of resamples lack it and have no AUC
    y = np.zeros(12, dtype=int)
    y[3] = 1
    p = np.linspace(0.1, 0.9, 12)
    proba = np.c_[1 - p, p]
    ci = bootstrap_ci("roc_auc", y, proba, n_resamples=400, seed=2)
    rng = np.random.default_rng(2)
    lacking = sum(len(np.unique(y[_resample_indices(12, None, rng)])) < 2 for _ in range(400))
    assert 0.2 * 400 < lacking < 0.5 * 400
    assert (ci.n_dropped, ci.n_resamples) == (lacking, 400 - lacking)
    assert ci.to_dict()["n_dropped"] == lacking
    note = f"{lacking} of 400 resamples ({lacking / 400:.0%}) dropped"
    assert note in ci.to_dict()["dropped_note"] and note in str(ci)
    paired = paired_bootstrap("roc_auc", y, proba, proba[::-1], n_resamples=400, seed=2)
    assert paired.difference.n_dropped == lacking and note in paired.difference.dropped_note
    # with both classes common, nothing is dropped and nothing is said
    y2, proba2 = _binary(n=80, seed=1)
    plain = bootstrap_ci("roc_auc", y2, proba2, n_resamples=200, seed=0)
    assert plain.n_dropped == 0 and "dropped_note" not in plain.to_dict() and "dropped" not in str(plain)


# -- DeLong ----------------------------------------------------------------------------------------------
def _naive_delong(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float, float, float]:
    """DeLong et al. (1988) by the definition: O(m·n) Mann-Whitney kernel, 0.5 for ties."""
    y = y.astype(bool)
    v10, v01, aucs = [], [], []
    for s in (a, b):
        pos, neg = s[y], s[~y]
        psi = (pos[:, None] > neg[None, :]).astype(float) + 0.5 * (pos[:, None] == neg[None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))  # one per positive case
        v01.append(psi.mean(axis=0))  # one per negative case
    m, n = int(y.sum()), int((~y).sum())
    s10 = np.array([[np.sum((v10[i] - aucs[i]) * (v10[j] - aucs[j])) / (m - 1) for j in range(2)] for i in range(2)])
    s01 = np.array([[np.sum((v01[i] - aucs[i]) * (v01[j] - aucs[j])) / (n - 1) for j in range(2)] for i in range(2)])
    s = s10 / m + s01 / n
    contrast = np.array([1.0, -1.0])
    var = contrast @ s @ contrast
    z = (aucs[0] - aucs[1]) / np.sqrt(var)
    return aucs[0], aucs[1], z, 2 * stats.norm.sf(abs(z))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_matches_naive_definition(seed):
    rng = np.random.default_rng(seed)
    n = 90
    y = rng.integers(0, 2, n)
    a = y + rng.normal(scale=0.8, size=n)
    b = 0.5 * a + rng.normal(scale=1.0, size=n)
    # ties within and across classes: rounding makes many equal scores
    a, b = np.round(a, 1), np.round(b, 1)
    assert len(np.unique(a)) < n and len(np.unique(b)) < n
    result = delong_test(y, a, b)
    auc_a, auc_b, z, p = _naive_delong(y, a, b)
    assert result.auc_a == pytest.approx(auc_a, abs=1e-12)
    assert result.auc_b == pytest.approx(auc_b, abs=1e-12)
    assert result.auc_a == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert result.z == pytest.approx(z, abs=1e-8)
    assert result.p_value == pytest.approx(p, abs=1e-8)
    assert abs(result.z) > 0.1  # a real difference, not the degenerate case
    # the CI of the difference is centred on it, ±1.96 standard errors
    se = (auc_a - auc_b) / z
    assert result.ci_low == pytest.approx(auc_a - auc_b - 1.959963984540054 * se, abs=1e-8)
    assert result.ci_high == pytest.approx(auc_a - auc_b + 1.959963984540054 * se, abs=1e-8)


def test_delong_identical_scores_p_one():
    y, proba = _binary(n=60, seed=6)
    result = delong_test(y, proba[:, 1], proba[:, 1])
    assert result.p_value == 1.0
    assert result.z == 0.0
    assert result.auc_a == result.auc_b == pytest.approx(roc_auc_score(y, proba[:, 1]), abs=1e-12)
    assert set(result.to_dict()) == {"auc_a", "auc_b", "z", "p_value", "ci_low", "ci_high"}


def test_delong_detects_a_better_model():
    rng = np.random.default_rng(12)
    y = rng.integers(0, 2, 200)
    good = y + rng.normal(scale=0.5, size=200)
    noise = rng.normal(size=200)
    result = delong_test(y, good, noise)
    assert result.z > 3
    assert result.p_value < 1e-3
    assert 0 < result.ci_low < result.auc_a - result.auc_b < result.ci_high


# -- intervals at tiny n (issue 20) -------------------------------------------------------------------------
def test_no_interval_below_min_n_or_with_one_class_and_n_beside_every_ci():
    from medfm.analyze.report import interval_text as analyze_text
    from medfm.analyze.similarity import mean_interval
    from medfm.evaluate.metrics import MIN_CI_N, bootstrap_ci, interval_text, paired_bootstrap

    assert MIN_CI_N == 10
    one = bootstrap_ci("accuracy", np.array([1]), np.array([[0.87, 0.13]]), np.array([0, 1]))
    assert one.value == 0.0 and one.n == 1 and one.no_ci == "n = 1 is too few for an interval (fewer than 10)"
    data = one.to_dict()
    assert data["low"] is None and data["high"] is None and data["n"] == 1
    assert str(one) == "0.000 (no CI: n = 1 is too few for an interval (fewer than 10))"
    rng = np.random.default_rng(0)
    y = np.zeros(20, int)
    single = bootstrap_ci("accuracy", y, np.c_[np.full(20, 0.7), np.full(20, 0.3)], np.array([0, 1]))
    assert single.value == 1.0 and single.no_ci == "the 20 rows hold one class only"
    y = np.tile([0, 1], 20)
    p1 = np.clip(y * 0.3 + rng.uniform(0, 0.7, 40), 0, 1)
    proba = np.c_[1 - p1, p1]
    full = bootstrap_ci("roc_auc", y, proba, n_resamples=200)
    assert full.no_ci is None and full.n == 40 and full.low < full.value < full.high
    assert str(full) == f"{full.value:.3f} (95% CI {full.low:.3f}–{full.high:.3f}, n = 40)"
    grouped = bootstrap_ci("roc_auc", y, proba, groups=np.repeat(np.arange(5), 8), n_resamples=200)
    assert grouped.n == 5 and grouped.no_ci.startswith("n = 5 is too few")  # 5 patients, whatever the rows
    paired = paired_bootstrap("roc_auc", y[:6], proba[:6], proba[::-1][:6], n_resamples=100)
    assert paired.difference.n == 6 and paired.p_text.startswith("no p-value (no interval: n = 6")
    assert interval_text(paired.difference.to_dict(), signed=True).startswith(f"{paired.difference.value:+.3f} (no CI")
    # whitened similarities of 4 images: a mean, but no interval
    four = mean_interval(np.array([0.01, 0.012, 0.009, 0.011]), 100)
    assert four.n == 4 and np.isnan(four.low) and four.no_ci.startswith("n = 4")
    assert analyze_text(four.value, four.low, four.high, n=4) == "0.010 (no CI, n = 4)"  # mean 0.0105
    twelve = mean_interval(rng.normal(size=12), 100)
    assert analyze_text(twelve.value, twelve.low, twelve.high, n=12).endswith(", n = 12)")
