"""Linear probes on real data and the speed of the C search.

1. On ../shared/data — PneumoniaMNIST and BreastMNIST pixels, AdrenalMNIST3D voxels, flattened into
   feature tables with their official train/val/test splits — the test AUC with its 95% bootstrap CI at
   train fractions 1, 0.5, 0.2, 0.1 (mean over repeats below 1).
2. The cost of a bootstrap of binary AUC + average precision: medfm's numpy metrics against scikit-learn's.
3. The wall time of a 100-trial Optuna search on 500 × 4096 features (5 folds), against cold full-width
   fits of scikit-learn's LogisticRegression in the same process (the naive way), per trial, and the ratio.
Run: ``.venv/bin/python benchmarks/probe_real.py [--trials 30 --repeats 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold

from medfm.evaluate.linear import LinearProbe
from medfm.evaluate.metrics import score
from medfm.evaluate.probe import run_fractions

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = {
    "PneumoniaMNIST": "pneumoniamnist/pneumoniamnist_reconstructed.npz",
    "BreastMNIST": "breastmnist/breastmnist.npz",
    "AdrenalMNIST3D": "adrenalmnist3d/adrenalmnist3d.npz",
}


def feature_table(path: Path) -> pd.DataFrame:
    """Flattened images (÷255) as feat_ columns, with label and split columns."""
    data = np.load(path)
    parts = []
    for split in ("train", "val", "test"):
        images = data[f"{split}_images"]
        x = images.reshape(len(images), -1).astype(np.float32) / 255.0
        part = pd.DataFrame(x, columns=[f"feat_{i}" for i in range(x.shape[1])])
        part.insert(0, "label", data[f"{split}_labels"].reshape(-1).astype(int))
        part.insert(1, "split", split)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def real_data(trials: int, repeats: int, fractions: list[float]) -> None:
    print(f"test ROC AUC (95% bootstrap CI), {trials}-trial Optuna search on train→val, refit on train+val")
    for name, rel in SETS.items():
        path = DATA / rel
        if not path.exists():
            print(f"{name}: {path} not found, skipped")
            continue
        table = feature_table(path)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            runs = run_fractions(
                table, "label", tmp, fractions, repeats, trials=trials, n_bootstrap=1000, progress=False
            )
        n_features = sum(c.startswith("feat_") for c in table.columns)
        print(f"{name} ({len(table)} rows × {n_features} features, {time.perf_counter() - start:.0f} s)")
        for fraction, group in runs.groupby("fraction", sort=False):
            if len(group) == 1:
                r = group.iloc[0]
                print(f"  fraction {fraction:<4g} AUC {r.value:.3f} ({r.low:.3f}–{r.high:.3f})")
            else:
                print(
                    f"  fraction {fraction:<4g} AUC {group.value.mean():.3f} ± {group.value.std():.3f} over "
                    f"{len(group)} draws (mean CI {group.low.mean():.3f}–{group.high.mean():.3f})"
                )


def search_speed(trials: int, baseline_trials: int) -> None:
    rng = np.random.default_rng(0)
    n, d = 500, 4096
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, d))
    x[:, :64] += 0.25 * y[:, None]
    folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(x, y))
    start = time.perf_counter()
    LinearProbe(trials=trials, seed=0).fit(x, y, folds)
    ours = time.perf_counter() - start
    cs = np.exp(np.random.default_rng(1).uniform(np.log(1e-6), np.log(1e3), baseline_trials))
    per_trial = []
    for c in cs:  # the naive way: standardise, then a cold full-width fit per fold
        t0 = time.perf_counter()
        for train, _ in folds:
            m, s = x[train].mean(0), x[train].std(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                LogisticRegression(C=c, max_iter=2000, tol=1e-6).fit((x[train] - m) / s, y[train])
        per_trial.append(time.perf_counter() - t0)
    naive = statistics.median(per_trial)
    print(f"search on {n} × {d} features, 5 folds")
    print(f"  medfm LinearProbe, {trials} Optuna trials: {ours:.1f} s ({ours / trials:.3f} s/trial)")
    print(
        f"  cold full-width fits (median of {baseline_trials} trials): {naive:.3f} s/trial "
        f"→ {naive * trials:.0f} s for {trials}; ratio {naive * trials / ours:.1f}×"
    )


def metric_speed(n: int = 600, resamples: int = 1000, repeats: int = 5) -> None:
    """A bootstrap's cost: binary AUC + average precision over resamples, medfm's numpy vs scikit-learn's."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    p = np.round(np.clip(0.3 * y + rng.random(n), 0, 1), 2)  # rounded: ties, as real scores have
    proba = np.stack([1 - p, p], axis=1)
    draws = [rng.integers(0, n, n) for _ in range(resamples)]

    def ours() -> list[float]:
        return [score("roc_auc", y[i], proba[i]) + score("average_precision", y[i], proba[i]) for i in draws]

    def sklearn() -> list[float]:
        return [roc_auc_score(y[i], p[i]) + average_precision_score(y[i], p[i]) for i in draws]

    times = {}
    for name, fn in (("medfm", ours), ("scikit-learn", sklearn)):
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            values = fn()
            runs.append(time.perf_counter() - start)
        times[name] = (statistics.median(runs), values)
    diff = float(np.max(np.abs(np.subtract(times["medfm"][1], times["scikit-learn"][1]))))
    print(f"bootstrap of binary AUC + AP, {resamples} resamples of {n} rows (median of {repeats})")
    print(
        f"  medfm {times['medfm'][0]:.3f} s, scikit-learn {times['scikit-learn'][0]:.3f} s: "
        f"{times['scikit-learn'][0] / times['medfm'][0]:.0f}× faster; max difference {diff:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30, help="Optuna trials per real-data run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1])
    parser.add_argument("--search-trials", type=int, default=100)
    parser.add_argument("--baseline-trials", type=int, default=5)
    args = parser.parse_args()
    metric_speed()
    search_speed(args.search_trials, args.baseline_trials)
    real_data(args.trials, args.repeats, args.fractions)


if __name__ == "__main__":
    main()
