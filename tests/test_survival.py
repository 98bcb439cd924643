"""Ridge Cox probe: Breslow likelihood and gradient, C-index, row-span exactness, the run and its CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import check_grad, minimize

from medfm.cli import main
from medfm.errors import ManifestError
from medfm.evaluate.probe import run_fractions
from medfm.evaluate.survival import (
    CoxProbe,
    _neg_log_partial_likelihood,
    alive_at_labels,
    concordance_index,
    run_survival,
)


def _breslow_by_hand(eta, time, event):
    total = 0.0
    for i in range(len(time)):
        if event[i]:
            total += eta[i] - np.log(np.exp(eta[time >= time[i]]).sum())
    return -total


def test_partial_likelihood_and_gradient_with_ties():
    rng = np.random.default_rng(0)
    time = rng.integers(1, 8, 40).astype(float)  # many ties
    event = rng.integers(0, 2, 40).astype(float)
    eta = rng.normal(size=40)
    loss, _ = _neg_log_partial_likelihood(eta, time, event)
    assert loss == pytest.approx(_breslow_by_hand(eta, time, event), rel=1e-12)
    f = lambda e: _neg_log_partial_likelihood(e, time, event)[0]  # noqa: E731
    g = lambda e: _neg_log_partial_likelihood(e, time, event)[1]  # noqa: E731
    assert check_grad(f, g, eta) < 1e-5


def test_concordance_index_by_hand():
    time = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.array([1, 1, 0, 1])
    assert concordance_index(time, event, -time) == 1.0  # earlier death, higher risk
    assert concordance_index(time, event, time) == 0.0
    # Comparable pairs: (0,1) (0,2) (0,3) (1,2) (1,3); risk ties count one half.
    risk = np.array([2.0, 2.0, 1.0, 0.0])
    assert concordance_index(time, event, risk) == pytest.approx((0.5 + 1 + 1 + 1 + 1) / 5)


def _harrell_by_pairs(time, event, risk):
    """Harrell's C from the definition, pair by pair (lifelines' and scikit-survival's tie convention)."""
    concordant = comparable = 0.0
    for i in range(len(time)):
        for j in range(len(time)):
            if event[i] and (time[i] < time[j] or (time[i] == time[j] and not event[j])):
                comparable += 1
                concordant += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return concordant / comparable


def test_concordance_index_event_and_censoring_at_the_same_time_are_comparable():
    # n = 2, same time, one event: the censored subject outlived it; lifelines and scikit-survival give 1.0 / 0.0
    assert concordance_index([5.0, 5.0], [1, 0], [2.0, 1.0]) == 1.0
    assert concordance_index([5.0, 5.0], [1, 0], [1.0, 2.0]) == 0.0
    assert concordance_index([5.0, 5.0], [1, 0], [1.0, 1.0]) == 0.5
    assert np.isnan(concordance_index([5.0, 5.0], [1, 1], [2.0, 1.0]))  # two tied events: no comparable pair
    # tied times and tied risks; lifelines 0.30.3 (concordance_index(time, -risk, event)) gives 0.7222222222222222
    time = np.array([3.0, 3.0, 5.0, 5.0, 5.0, 7.0, 8.0, 8.0])
    event = np.array([1, 0, 1, 1, 0, 1, 0, 1])
    risk = np.array([2.0, 2.0, 1.0, 3.0, 1.0, 0.0, 0.0, 2.0])
    assert concordance_index(time, event, risk) == pytest.approx(13 / 18, abs=1e-15)
    assert _harrell_by_pairs(time, event, risk) == pytest.approx(13 / 18, abs=1e-15)


# lifelines 0.30.3 on the seeded tied data below (times 1..5, risks 0..3: many ties of both kinds)
LIFELINES_C = {0: 0.45248868778280543, 1: 0.45026881720430106, 2: 0.36899038461538464}


@pytest.mark.parametrize("seed", sorted(LIFELINES_C))
def test_concordance_index_equals_lifelines_on_tied_data(seed):
    rng = np.random.default_rng(seed)
    time = rng.integers(1, 6, 40).astype(float)
    event = rng.integers(0, 2, 40)
    risk = rng.integers(0, 4, 40).astype(float)
    c = concordance_index(time, event, risk)
    assert c == pytest.approx(LIFELINES_C[seed], abs=1e-12)
    assert c == pytest.approx(_harrell_by_pairs(time, event, risk), abs=1e-12)
    try:  # where lifelines is installed, ask it again (it is not a dependency: it pins pandas < 3)
        from lifelines.utils import concordance_index as lifelines_c
    except ImportError:
        return
    assert c == pytest.approx(lifelines_c(time, -risk, event), abs=1e-12)


def test_row_span_fit_equals_full_fit():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 60))
    time = rng.exponential(1.0, 30)
    event = (rng.random(30) < 0.7).astype(float)
    probe = CoxProbe(alpha=2.0).fit(x, time, event)
    xs = (x - probe.mean_) / probe.scale_

    def objective(w):
        loss, grad = _neg_log_partial_likelihood(xs @ w, time, event)
        return loss + w @ w, xs.T @ grad + 2.0 * w

    full = minimize(objective, np.zeros(60), jac=True, method="L-BFGS-B", options={"maxiter": 2000, "gtol": 1e-10})
    np.testing.assert_allclose(probe.risk(x), xs @ full.x, atol=1e-4)


def test_alive_at_labels_leaves_out_early_censoring():
    time = np.array([100.0, 400.0, 200.0, 800.0])
    event = np.array([1, 1, 0, 0])
    known, died = alive_at_labels(time, event, 365)
    assert known.tolist() == [True, True, False, True]
    assert died.tolist() == [1, 0, 0]


def _survival_table(n=240, d=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    hazard = np.exp(1.5 * x[:, 0] - 1.0 * x[:, 1])
    t = rng.exponential(365 / hazard)
    c = rng.exponential(900, n)
    table = pd.DataFrame(x, columns=[f"feat_{i}" for i in range(d)])
    table["days"] = np.minimum(t, c)
    table["dead"] = (t <= c).astype(int)
    table["patient"] = [f"p{i // 2}" for i in range(n)]
    return table


def test_run_survival_finds_the_signal(tmp_path):
    report = run_survival(_survival_table(), "days", "dead", tmp_path, horizon=365, group="patient", n_bootstrap=200)
    c = report["test"]["c_index"]
    assert c["value"] > 0.75 and c["low"] < c["value"] < c["high"]
    assert report["test"]["auc_died_by_365"]["value"] > 0.75
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test"]["c_index"] == c
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert len(predictions) == report["n_test"] and {"risk", "days", "dead"} <= set(predictions.columns)


def test_cli_probe_survival(tmp_path, capsys):
    path = tmp_path / "f.parquet"
    _survival_table().to_parquet(path)
    code = main(
        [
            "probe",
            str(path),
            "--survival",
            "days",
            "dead",
            "--horizon",
            "365",
            "--out",
            str(tmp_path / "o"),
            "--bootstrap",
            "100",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "test c_index:" in out and "test auc_died_by_365:" in out


def test_train_fractions_keep_the_test_rows(tmp_path):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    x = rng.normal(size=(200, 10)) + 2.0 * y[:, None]
    table = pd.DataFrame(x, columns=[f"feat_{i}" for i in range(10)])
    table["y"] = y
    runs = run_fractions(table, "y", tmp_path, [1.0, 0.5, 0.2], repeats=2, trials=3, n_bootstrap=50, progress=False)
    assert runs[["fraction", "repeat"]].values.tolist() == [[1.0, 0], [0.5, 0], [0.5, 1], [0.2, 0], [0.2, 1]]
    tested = {tuple(pd.read_csv(p)["row"]) for p in tmp_path.glob("fraction_*/repeat_*/predictions.csv")}
    assert len(tested) == 1  # every run is judged on the same test rows
    sizes = {}
    for p in tmp_path.glob("fraction_*/repeat_*/results.json"):
        summary = json.loads(p.read_text())
        sizes[(summary["train_fraction"], summary["fraction_seed"])] = sum(
            summary["class_balance"]["development"].values()
        )
    assert sizes[(1.0, 0)] == 160 and 75 <= sizes[(0.5, 0)] <= 85 and 28 <= sizes[(0.2, 1)] <= 36
    assert (tmp_path / "fractions.md").read_text().startswith("| train fraction |")


def test_a_decimal_comma_in_the_time_column_names_the_file_column_and_row(tmp_path):
    table = _survival_table(n=40, d=4)
    table["days"] = [f"{v:.3f}" for v in table["days"]]
    table.loc[7, "days"] = "0,640"
    path = tmp_path / "f.csv"
    table.to_csv(path, index=False)
    with pytest.raises(ManifestError) as info:
        run_survival(path, "days", "dead", tmp_path / "out", n_bootstrap=10)
    assert str(info.value) == (
        f"feature table {path}: column days, row 7 holds '0,640': decimal commas are not read; write decimal points "
        "(0.640), with commas only between columns"
    )
