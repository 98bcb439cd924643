"""``medfm probe`` / ``predict`` / ``compare``: a tuned linear probe, honest test metrics with CIs, saved as data."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medfm.data.manifest import read_table
from medfm.data.outputs import check_output, write_json, write_table
from medfm.data.splits import make_splits
from medfm.errors import ManifestError, MedfmError
from medfm.evaluate.features import (
    describe_provenance,
    feature_columns,
    feature_matrix,
    read_features,
    read_labelled,
    table_provenance,
    table_source,
)
from medfm.evaluate.figures import Scores, describe_features, roc_pr_figures
from medfm.evaluate.linear import LinearProbe
from medfm.evaluate.metrics import METRICS, Interval, bootstrap_ci, delong_test, paired_bootstrap
from medfm.progress import progress_bar


@dataclass
class ProbeResult:
    """The test metrics of a fitted probe and where its files are."""

    scoring: str
    metrics: dict[str, Interval]
    best_c: float
    out_dir: Path
    results: Path
    probe: Path
    counts: dict[str, int | None] = field(default_factory=dict)

    @property
    def test_metric(self) -> Interval:
        """The metric the search optimised, on the test rows, with its CI."""
        return self.metrics[self.scoring]


def run_probe(
    features: str | os.PathLike[str] | pd.DataFrame,
    label: str,
    out_dir: str | os.PathLike[str],
    scoring: str = "roc_auc",
    search: str = "optuna",
    trials: int = 100,
    split_column: str | None = "split",
    cv: int | None = None,
    group: str | None = None,
    test_size: float = 0.2,
    n_bootstrap: int = 1000,
    seed: int = 0,
    storage: str | None = None,
    feature_prefix: str | None = None,
    progress: bool = True,
    train_fraction: float = 1.0,
    fraction_seed: int = 0,
    provenance: dict | None = None,
    label_missing: Sequence[str] | None = None,
    figure_format: str = "png",
) -> ProbeResult:
    """Fit a probe on train(+val) with a searched C, refit on train+val, judge it once on test.

    The probe records the feature columns and what made them (the table's sidecar: model, weight SHA-256,
    profile; or ``provenance`` given with a DataFrame), so that ``predict`` refuses another model's table.
    Rows whose label is one of ``label_missing`` (default: 'NA', 'unknown', '?', …) are left out and counted.
    """
    check_output(out_dir, folder=True)  # before the work: a read-only folder or a file in the way is said now
    provenance = table_provenance(features) if provenance is None else provenance
    data = read_labelled(features, label, group, feature_prefix, split_column, missing=label_missing)
    if not isinstance(features, pd.DataFrame) and os.path.isdir(features):
        split_column = split_column or "split"  # FMCIB's layout: the split is the file a row came from
    table, x, y, groups, columns = data.table, data.x, data.y, data.groups, data.columns
    splits = make_splits(table, y, split_column, cv, groups, test_size, seed, train_fraction, fraction_seed)
    dev = splits.development
    folds = [(np.searchsorted(dev, a), np.searchsorted(dev, b)) for a, b in splits.folds]
    probe = LinearProbe(
        scoring=scoring,
        search=search,
        trials=trials,
        seed=seed,
        storage=storage,
        study_name=_study_name(label, scoring, x[dev], y[dev], folds) if storage else None,
    )
    total = 45 if search == "grid" else trials
    with progress_bar(progress) as bar:
        task = bar.add_task(f"searching C ({search})", total=total)
        probe.fit(x[dev], y[dev], folds, progress=lambda: bar.advance(task))
    test = splits.test
    proba = probe.predict_proba(x[test])
    test_groups = None if groups is None else groups[test]
    metrics = {m: bootstrap_ci(m, y[test], proba, probe.classes_, test_groups, n_bootstrap, seed=seed) for m in METRICS}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    probe_path = probe.save(out / "probe", feature_columns=columns, provenance=provenance)
    predictions = pd.DataFrame({"row": data.rows[test], label: y[test]})
    if group:
        predictions[group] = groups[test]
    # the table's own columns (patient and image IDs, coordinates, split) beside each prediction
    kept = [c for c in table.columns if c not in set(columns) | set(predictions.columns)]
    predictions = pd.concat([predictions, table.iloc[test][kept].reset_index(drop=True)], axis=1)
    for k, c in enumerate(probe.classes_):
        predictions[f"proba_{c}"] = proba[:, k]
    predictions["predicted"] = probe.classes_[np.argmax(proba, axis=1)]
    write_table(predictions, out / "predictions.csv")
    counts = {
        name: {str(c): int(np.sum(y[idx] == c)) for c in probe.classes_}
        for name, idx in (("development", dev), ("test", test))
    }
    summary = {
        "label": label,
        "scoring": scoring,
        "test": {m: metrics[m].to_dict() for m in METRICS},
        "best_c": probe.best_c_,
        "search": {"kind": search, "trials": len(probe.trials_), "folds": len(folds), "how": splits.how},
        "class_balance": counts,
        "n_missing_labels": data.n_missing,
        "grouped_by": group,
        "train_fraction": train_fraction,
        "fraction_seed": fraction_seed,
        **splits.counts(),
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "features": str(features) if not isinstance(features, pd.DataFrame) else "<DataFrame>",
        "n_features": len(columns),
        "predictions": "predictions.csv",
        "probe": probe_path.name,
    }
    results = write_json(summary, out / "results.json")
    (out / "results.md").write_text(_markdown(summary, metrics))
    model, dataset = describe_features(features)
    positives = probe.classes_[1:] if len(probe.classes_) == 2 else probe.classes_
    curves = [Scores(str(c) if len(positives) > 1 else model, (y[test] == c).astype(int),
                     proba[:, list(probe.classes_).index(c)]) for c in positives]  # fmt: skip
    what = f"{label} = {positives[0]}" if len(positives) == 1 else f"{label}, one class against the rest"
    title = f"{model} on {dataset}: {what}; test split, n = {len(test)}"
    roc_pr_figures(curves, title, out, figure_format)
    return ProbeResult(scoring, metrics, probe.best_c_, out, results, probe_path, splits.counts())


def _study_name(label: str, scoring: str, x: np.ndarray, y: np.ndarray, folds: list) -> str:
    """An Optuna study name unique to the search's data, so a shared storage never mixes two feature sets."""
    digest = hashlib.sha256(np.ascontiguousarray(x).tobytes())
    digest.update(json.dumps([scoring, [str(v) for v in y]]).encode())
    for a, b in folds:
        digest.update(np.asarray(a, dtype=np.int64).tobytes() + b"|" + np.asarray(b, dtype=np.int64).tobytes())
    return f"medfm-probe-{label}-{scoring}-{digest.hexdigest()[:16]}"


def _markdown(summary: dict, metrics: dict[str, Interval]) -> str:
    lines = [
        f"# Linear probe: {summary['label']}",
        "",
        f"Search: {summary['search']['kind']}, {summary['search']['trials']} trials, {summary['search']['how']}; "
        f"best C = {summary['best_c']:.3g}.",
        "",
        "| metric (test) | value | 95% CI | n |",
        "| --- | --- | --- | --- |",
    ]
    for name, m in metrics.items():
        star = " (searched)" if name == summary["scoring"] else ""
        note = f" ({m.dropped_note})" if m.dropped_note else ""
        ci = f"no CI: {m.no_ci}" if m.no_ci else f"{m.low:.3f}–{m.high:.3f}{note}"
        lines.append(f"| {name}{star} | {m.value:.3f} | {ci} | {m.n} |")
    lines += ["", "Class balance:", ""]
    for part, counts in summary["class_balance"].items():
        lines.append(f"- {part}: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return "\n".join(lines) + "\n"


def predict(
    probe_path: str | os.PathLike[str], features: str | os.PathLike[str] | pd.DataFrame, out: str | os.PathLike[str]
) -> Path:
    """Apply a saved probe to a feature table; writes the table's other columns + class probabilities.

    The table must hold exactly the probe's feature columns and, where both record it, come from the same model,
    weights and profile: anything else is refused, naming both.
    """
    check_output(out)
    probe, columns = LinearProbe.load(probe_path)
    table = features if isinstance(features, pd.DataFrame) else read_table(features)
    columns = _check_columns(probe, columns, table)
    fitted, given = getattr(probe, "provenance_", None), table_provenance(features)
    if fitted and given and fitted != given:
        raise ManifestError(
            f"the probe {probe_path} was fitted on features of {describe_provenance(fitted)}; the table "
            f"{features} holds features of {describe_provenance(given)}: extract them the same way"
        )
    if fitted and not given:
        warnings.warn(
            f"the probe was fitted on features of {describe_provenance(fitted)}; the table has no sidecar "
            "(NAME.json), so that it comes from the same model cannot be checked",
            stacklevel=2,
        )
    x = feature_matrix(table, columns, table_source(features))
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if len(bad):
        raise ManifestError(f"feature table: row {bad[0]} has a missing or infinite feature ({len(bad)} rows)")
    proba = probe.predict_proba(x)
    result = table.drop(columns=columns).copy()
    for k, c in enumerate(probe.classes_):
        result[f"proba_{c}"] = proba[:, k]
    result["predicted"] = probe.classes_[np.argmax(proba, axis=1)]
    return write_table(result, out)


def _check_columns(probe: LinearProbe, recorded: list[str] | None, table: pd.DataFrame) -> list[str]:
    """The feature columns to apply ``probe`` to: the table's must be exactly the ones it was fitted on."""
    n_fitted = int(np.asarray(probe.coef_).shape[-1])
    if recorded is None:  # a probe saved before columns were recorded: at least the number must agree
        found = feature_columns(table)
        if len(found) != n_fitted:
            raise ManifestError(
                f"the probe was fitted on {n_fitted} features; the table has {len(found)} ({_span(found)})"
            )
        return found
    # the probe's own prefix, not the default feat_/pred_: a probe fitted with --feature-prefix works too
    prefix = recorded[0].rstrip("0123456789") if recorded else ""
    found = [c for c in table.columns if isinstance(c, str) and c.startswith(prefix) and c[len(prefix) :].isdigit()]
    if set(found) != set(recorded):
        missing = [c for c in recorded if c not in table.columns]
        what = f"lacks {len(missing)} of them, e.g. {missing[:3]}" if missing else f"has {len(found)} ({_span(found)})"
        raise ManifestError(
            f"the probe was fitted on {len(recorded)} feature columns ({_span(recorded)}); the table {what}"
        )
    return recorded


def _span(columns: list[str]) -> str:
    """A list of feature columns in a few words: ``feat_0 … feat_511``."""
    if not columns:
        return "none"
    return columns[0] if len(columns) == 1 else f"{columns[0]} … {columns[-1]}"


@dataclass
class ScoredRun:
    """The test predictions of one run, as compare pairs them: ``table`` has ``row``, ``truth`` (as text) and
    ``proba_<class>`` columns (and the group column when the run was grouped)."""

    path: Path
    kind: str
    label: str
    scoring: str
    group: str | None
    table: pd.DataFrame


def _fraction_run(folder: Path, fraction: float | None, repeat: int) -> Path:
    """The results.json of one run of a ``--train-fraction`` folder (fraction 1 unless told)."""
    runs = sorted(folder.glob("fraction_*/repeat_*/results.json"))
    available = sorted({p.parent.parent.name.removeprefix("fraction_") for p in runs}, key=float)
    chosen = f"fraction_{(1.0 if fraction is None else fraction):g}"
    path = folder / chosen / f"repeat_{repeat}" / "results.json"
    if not path.is_file():
        raise MedfmError(
            f"{folder}: a --train-fraction run has no {chosen}/repeat_{repeat}/results.json; its fractions are "
            f"{available}: choose one with --fraction F (and --repeat R), or pass one run's results.json"
        )
    return path


def read_scored_run(path: str | os.PathLike[str], fraction: float | None = None, repeat: int = 0) -> ScoredRun:
    """The test predictions of any results medfm writes that compare can pair: a probe's results.json, a
    ``--train-fraction`` folder (or its fractions.csv; one fraction and repeat of it), a fine-tuned classifier's
    results.json (or its run folder). Detection and segmentation runs are refused with the reason."""
    path = Path(path)
    if path.name == "fractions.csv" or (path.is_dir() and (path / "fractions.csv").is_file()):
        path = _fraction_run(path.parent if path.is_file() else path, fraction, repeat)
    elif path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise MedfmError(
            f"{path}: no such results file; compare reads a probe's or a fine-tuned run's results.json, or the "
            "folder of a --train-fraction probe"
        )
    try:
        summary = json.loads(path.read_text())
    except ValueError as err:
        raise MedfmError(f"{path}: not a JSON results file ({err})") from None
    if "predictions" in summary and "label" in summary:  # medfm probe
        table = pd.read_csv(path.parent / summary["predictions"])
        label = summary["label"]
        table = table.rename(columns={label: "truth"}).assign(truth=lambda t: t["truth"].astype(str))
        return ScoredRun(path, "probe", label, summary["scoring"], summary.get("grouped_by"), table)
    if "iou_thresholds" in summary or summary.get("task") == "segmentation":
        raise MedfmError(
            f"{path}: a {'detection' if 'iou_thresholds' in summary else 'segmentation'} run; compare pairs per-row "
            "class probabilities, so it covers probes and binary or multiclass fine-tuning"
        )
    if "task" in summary and "test" in summary:  # medfm finetune fit
        task = summary["task"]
        if task not in ("binary", "multiclass"):
            raise MedfmError(
                f"{path}: a fine-tuned {task} run; compare pairs class probabilities, so it covers probes and "
                "binary or multiclass fine-tuning"
            )
        predictions = path.parent / "test_predictions.csv"
        if not predictions.is_file():
            raise MedfmError(f"{path}: its test_predictions.csv is missing; it is written by `medfm finetune fit`")
        table = pd.read_csv(predictions)
        table = table.rename(columns={c: "proba_" + c[len("prob_") :] for c in table.columns if c.startswith("prob_")})
        table["truth"] = table["truth"].astype(str)
        return ScoredRun(path, "finetune", "truth", "roc_auc", None, table)
    raise MedfmError(f"{path}: not a results.json medfm writes (keys {sorted(summary)[:8]})")


def compare(
    results_a: str | os.PathLike[str],
    results_b: str | os.PathLike[str],
    n_bootstrap: int = 1000,
    seed: int = 0,
    fraction: float | None = None,
    repeat: int = 0,
) -> dict[str, object]:
    """Paired comparison of two runs' test predictions (same rows): bootstrap CI of the difference, DeLong.

    Each side is any results file :func:`read_scored_run` reads (probe, --train-fraction folder, fine-tuning)."""
    ra, rb = (read_scored_run(p, fraction, repeat) for p in (results_a, results_b))
    if ra.kind == rb.kind == "probe" and ra.label != rb.label:
        raise MedfmError(f"the probes predict different labels: {ra.label!r} and {rb.label!r}")
    pa, pb = ra.table, rb.table
    merged = pa.merge(pb, on="row", suffixes=("_a", "_b"))
    if len(merged) != len(pa) or len(merged) != len(pb):
        raise MedfmError(f"the runs were tested on different rows ({len(pa)} and {len(pb)}, {len(merged)} shared)")
    y = merged["truth_a"].to_numpy()
    if not np.array_equal(y, merged["truth_b"].to_numpy()):
        raise MedfmError("the two prediction files disagree on the labels of the same rows")
    classes = np.unique(y)
    missing = [f"proba_{c}_{s}" for c in classes for s in "ab" if f"proba_{c}_{s}" not in merged.columns]
    if missing:
        raise MedfmError(f"the runs do not name the same classes (no column {missing[0]})")
    probas = [merged[[f"proba_{c}_{s}" for c in classes]].to_numpy() for s in ("a", "b")]
    group = ra.group if ra.group == rb.group else None
    groups = merged[f"{group}_a"].astype(str).to_numpy() if group else None
    scoring = ra.scoring if ra.kind == "probe" else rb.scoring
    paired = paired_bootstrap(scoring, y, probas[0], probas[1], classes, groups, n_bootstrap, seed=seed)
    report: dict[str, object] = {
        "a": {"results": str(ra.path), "kind": ra.kind},
        "b": {"results": str(rb.path), "kind": rb.kind},
        "scoring": scoring,
        "n_test": len(y),
        "difference": paired.difference.to_dict(),
        "bootstrap_p": paired.p_value,
        "bootstrap_p_below": paired.p_below,
        "bootstrap_p_text": paired.p_text,
        "bootstrap": f"paired, resampling {'whole ' + group + ' groups' if group else 'rows'}",
    }
    if len(classes) == 2:
        delong = delong_test(y == classes[1], probas[0][:, 1], probas[1][:, 1]).to_dict()
        delong["assumes_independent_rows"] = True
        if group:  # DeLong's variance treats rows as independent: with several rows per group it is too small
            delong["note"] = (
                f"DeLong assumes independent rows; these {len(y)} rows come in {len(np.unique(groups))} "
                f"{group} groups, so its p-value is too small: use the grouped bootstrap"
            )
        report["delong"] = delong
    return report


def run_fractions(
    features: str | os.PathLike[str] | pd.DataFrame,
    label: str,
    out_dir: str | os.PathLike[str],
    fractions: list[float],
    repeats: int = 3,
    **probe_args: object,
) -> pd.DataFrame:
    """The probe at several training-data fractions (seeded, stratified, ``repeats`` draws each), same test rows.

    Writes ``fractions.csv`` / ``fractions.md`` (mean ± std of the test metric over repeats) beside a folder per run.
    """
    out = Path(out_dir)
    records = []
    split_column = probe_args.get("split_column", "split")
    table = features if isinstance(features, pd.DataFrame) else read_features(features, None, split_column)[0]
    provenance = table_provenance(features)
    for fraction in fractions:
        for repeat in range(1 if fraction == 1 else repeats):
            result = run_probe(
                table,
                label,
                out / f"fraction_{fraction:g}" / f"repeat_{repeat}",
                provenance=provenance,
                train_fraction=fraction,
                fraction_seed=repeat,
                **probe_args,
            )
            m = result.test_metric
            records.append(
                {
                    "fraction": fraction,
                    "repeat": repeat,
                    "metric": result.scoring,
                    "value": m.value,
                    "low": m.low,
                    "high": m.high,
                    "best_c": result.best_c,
                    **{k: result.counts[k] for k in ("n_train", "n_val", "n_labelled", "n_labelled_available")},
                }
            )
    runs = pd.DataFrame(records)
    write_table(runs, out / "fractions.csv")
    summary = runs.groupby("fraction", sort=False)["value"].agg(["mean", "std", "count"]).reset_index()
    used = runs.groupby("fraction", sort=False)["n_labelled"].mean()
    available = int(runs["n_labelled_available"].iloc[0])
    lines = [
        f"| train fraction | labelled rows used (of {available}) | test {runs['metric'].iloc[0]} (mean) "
        "| std over repeats | repeats |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r.fraction:g} | {used[r.fraction]:.0f} | {r['mean']:.3f} | {0 if np.isnan(r['std']) else r['std']:.3f} "
        f"| {int(r['count'])} |"
        for _, r in summary.iterrows()
    ]
    (out / "fractions.md").write_text("\n".join(lines) + "\n")
    return runs


def compare_tables(
    features_a: str | os.PathLike[str] | pd.DataFrame,
    features_b: str | os.PathLike[str] | pd.DataFrame,
    label: str,
    out_dir: str | os.PathLike[str],
    n_bootstrap: int = 1000,
    **probe_args: object,
) -> dict[str, object]:
    """Fit the same probe on two feature tables of the same rows (same splits, seeds) and compare them."""
    out = Path(out_dir)
    results = [
        run_probe(features, label, out / name, n_bootstrap=n_bootstrap, **probe_args).results
        for name, features in (("a", features_a), ("b", features_b))
    ]
    _plot_both(features_a, features_b, label, out, str(probe_args.get("figure_format", "png")))
    return compare(results[0], results[1], n_bootstrap=n_bootstrap, seed=int(probe_args.get("seed", 0)))


def _plot_both(
    features_a: str | os.PathLike[str] | pd.DataFrame,
    features_b: str | os.PathLike[str] | pd.DataFrame,
    label: str,
    out: Path,
    figure_format: str,
) -> None:
    """Both probes' ROC and PR curves on one pair of axes (binary labels; the same test rows)."""
    tables = [pd.read_csv(out / name / "predictions.csv") for name in ("a", "b")]
    proba = [c for c in tables[0].columns if c.startswith("proba_")]
    if len(proba) != 2:
        return  # several classes: each probe's own one-against-the-rest figures stand
    names = [describe_features(f)[0] for f in (features_a, features_b)]
    names = [f"A: {names[0]}", f"B: {names[1]}"]
    positive = proba[1][len("proba_") :]
    curves = [
        Scores(name, (t[label].astype(str) == positive).astype(int).to_numpy(), t[proba[1]].to_numpy())
        for name, t in zip(names, tables)
    ]
    dataset = describe_features(features_a)[1]
    title = f"{dataset}: {label} = {positive}; test split, n = {len(tables[0])}"
    roc_pr_figures(curves, title, out, figure_format)
