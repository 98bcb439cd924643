"""The probes are scikit-learn estimators: clone, get/set_params, pipelines, NotFittedError, check_estimator.

Checks skipped for a probe are named here with their reason (``EXPECTED_FAILED``); every other check that
scikit-learn's ``check_estimator`` runs must pass.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import (
    check_get_params_invariance,
    check_no_attributes_set_in_init,
    check_parameters_default_constructible,
    check_set_params,
    parametrize_with_checks,
)

from medfm.evaluate.fewshot import FewShot
from medfm.evaluate.knn import KNNProbe
from medfm.evaluate.linear import LinearProbe
from medfm.evaluate.survival import CoxProbe

# Only checks that cannot apply are skipped; none is at present for the two classifiers.
EXPECTED_FAILED: dict[str, dict[str, str]] = {"LinearProbe": {}, "KNNProbe": {}}


def _expected_failed(estimator: object) -> dict[str, str]:
    return EXPECTED_FAILED[type(estimator).__name__]


# trials=3: the search is what the probe adds; three trials keep ~100 fits of the checks quick
@parametrize_with_checks([LinearProbe(trials=3), KNNProbe(k=3)], expected_failed_checks=_expected_failed)
def test_classifier_probes_pass_check_estimator(estimator, check):
    check(estimator)


# FewShot evaluates episodes and CoxProbe fits (features, times, events): neither has scikit-learn's fit(X, y)
# contract, so check_estimator's fit/predict checks cannot apply; the checks of the parameter contract do.
@pytest.mark.parametrize("estimator", [FewShot(ways=3, shots=2, c=0.5), CoxProbe(alpha=2.0)], ids=["FewShot", "Cox"])
@pytest.mark.parametrize(
    "check",
    [
        check_parameters_default_constructible,
        check_no_attributes_set_in_init,
        check_get_params_invariance,
        check_set_params,
    ],
)
def test_non_classifier_probes_keep_the_parameter_contract(estimator, check):
    check(type(estimator).__name__, estimator)
    copy = clone(estimator)
    assert copy is not estimator and copy.get_params() == estimator.get_params()


def _binary(n: int = 60, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    return rng.normal(size=(n, d)) + 1.5 * y[:, None], y


@pytest.mark.parametrize("probe", [LinearProbe(trials=3, scoring="accuracy"), KNNProbe(k=5)], ids=["linear", "knn"])
def test_probes_work_in_pipelines_and_cross_validation(probe):
    x, y = _binary()
    with pytest.raises(NotFittedError):
        clone(probe).predict(x)
    scores = cross_val_score(make_pipeline(StandardScaler(), clone(probe)), x, y, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.8  # the classes are 1.5 sd apart in every feature


def test_linear_probe_without_folds_searches_on_its_own_stratified_folds():
    x, y = _binary()
    probe = LinearProbe(trials=4, seed=1, cv=3).fit(x, y)
    again = LinearProbe(trials=4, seed=1, cv=3).fit(x, y, list(probe._default_folds(y)))
    assert probe.best_c_ == again.best_c_ and len(probe.trials_) == 4
    np.testing.assert_array_equal(probe.coef_, again.coef_)
    assert probe.n_features_in_ == 8 and probe.n_iter_ >= 1
    with pytest.raises(ValueError, match="X has 3 features, but LinearProbe is expecting 8 features"):
        probe.predict(x[:, :3])


def test_cox_probe_is_not_fitted_until_fit_and_checks_alpha_there():
    x, y = _binary()
    time, event = 1.0 + np.arange(60.0), (np.arange(60) % 3 > 0).astype(float)
    with pytest.raises(NotFittedError):
        CoxProbe().risk(x)
    bad = CoxProbe(alpha=-1.0)
    with pytest.raises(ValueError, match="alpha=-1.0"):
        bad.fit(x, time, event)
    assert CoxProbe().fit(x, time, event).risk(x).shape == (60,)
