"""What a fine-tuning run leaves behind, and how a fine-tuned model is run again.

In the run folder: ``results.json`` (test metrics with CIs, best epoch, sizes, initialisation), ``curves.csv`` and
``curves.png`` (per-epoch validation curves), ``splits.csv`` and ``test_predictions.csv``
(:mod:`medfm.train.outputs`), ``model.safetensors`` (trunk + head) with its card ``model.json``
(task, classes, architecture, profile with its full definition, the evaluation view, metrics, SHA-256).
:func:`predict_manifest` runs a card on a manifest with the model's own preprocessing.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from medfm.data.augment import build_view
from medfm.data.datasets import iter_volume_items
from medfm.data.labels import clean_labels
from medfm.data.manifest import read_manifest
from medfm.data.outputs import stem_of, write_errors, write_json, write_table, write_weights
from medfm.data.profiles import Profile, Profile2D, get_profile, profile_from_dict
from medfm.device import resolve_device
from medfm.errors import ManifestError, ModelError
from medfm.finetune.data import FinetuneData
from medfm.finetune.module import FinetuneModule, metric_intervals, mlp_head
from medfm.models import hub
from medfm.models.registry import build_trunk, trunk_args
from medfm.progress import progress_bar
from medfm.train.curves import write_curves
from medfm.train.outputs import write_splits, write_test_predictions

CARD_KIND = "medfm-finetuned"


def _named_report(report: dict, classes: list[str] | None) -> dict:
    """scikit-learn's classification report with class indices replaced by class names."""
    if not report or not classes:
        return report
    return {(classes[int(k)] if k.isdigit() and int(k) < len(classes) else k): v for k, v in report.items()}


def _test_columns(module: FinetuneModule, data: FinetuneData) -> dict[str, np.ndarray | list]:
    """Truth and prediction of each test row, named as ``medfm predict`` names its columns."""
    rows, task = module.test_rows, module.hparams.task
    output, target = np.asarray(rows["output"]), np.asarray(rows["target"]).reshape(len(rows.index), -1)
    if task in ("binary", "multiclass"):
        classes = data.classes or [str(k) for k in range(output.shape[1])]
        columns: dict[str, np.ndarray | list] = {"truth": [classes[int(k)] for k in target[:, 0]]}
        columns.update({f"prob_{name}": output[:, k] for k, name in enumerate(classes)})
        columns["predicted"] = [classes[k] for k in output.argmax(axis=1)]
        return columns
    if task == "regression":
        return {"truth": target[:, 0], "prediction": output[:, 0]}
    return {"truth_time": target[:, 0], "truth_event": target[:, 1], "risk": output[:, 0]}


def write_run_outputs(module: FinetuneModule, data: FinetuneData, folder: str | os.PathLike[str]) -> Path:
    """results.json, curves, model.safetensors and model.json of a finished run; returns the card's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hp = module.hparams
    store = data.store
    sizes = {s: int(np.sum(store.splits == s)) for s in ("train", "val", "test", "unused", "unlabelled")}
    report = module.init_report
    results = {
        "task": hp.task,
        "classes": data.classes,
        "init": hp.init,
        "init_coverage": getattr(report, "coverage", None),
        "freeze": hp.freeze,
        "train_fraction": data.hparams.train_fraction,
        "fraction_seed": data.hparams.fraction_seed,
        "sizes": sizes,
        "best": module.best,
        "test": module.test_results,
        "per_class": _named_report(module.test_report, data.classes),
    }
    write_json(results, folder / "results.json")
    truth = hp.task if hp.task == "survival" else data.hparams.label_column
    source = Path(data.hparams.manifest).name if data.hparams.manifest else "store"
    write_curves(module.history, folder, f"fine-tune {hp.trunk} ({hp.init}) · {hp.task}: {truth} · {source}")
    write_splits(folder, store.rows, store.splits, data.manifest_table)
    if module.test_rows is not None:
        write_test_predictions(
            folder, store.rows[module.test_rows.index], _test_columns(module, data), data.manifest_table
        )
    weights = write_weights(module, folder / "model.safetensors")
    profile = get_profile(data.hparams.profile) if data.hparams.manifest else None
    card = {
        "kind": CARD_KIND,
        "task": hp.task,
        "classes": data.classes,
        "trunk": {"name": hp.trunk, "args": trunk_args(hp.trunk, hp.trunk_args), "in_channels": hp.in_channels},
        "feature_dim": module.feature_dim,
        "head": [m.out_features for m in module.head if isinstance(m, torch.nn.Linear)],
        "profile": None if profile is None else profile.name,
        "profile_spec": None if profile is None else profile.to_dict(),
        "margin": store.margin,
        "coords": data.hparams.coords,
        "eval_view": data.hparams.eval_view or None,
        "view_size": list(data.view_size),
        "weights": weights.name,
        "sha256": hub.sha256_of(weights),
        "metrics": module.test_results,
        "best": module.best,
        "label_column": data.hparams.label_column,
        "time_column": data.hparams.time_column,
        "event_column": data.hparams.event_column,
        "label_missing": data.hparams.label_missing,
    }
    return write_json(card, folder / "model.json")


def _card_profile(card: dict) -> Profile | Profile2D:
    """The profile the model was trained with (from the card's own copy when this process does not know it)."""
    if card.get("profile") is None:
        raise ModelError("the model was trained on a prebuilt store: it has no profile to cut new images with")
    return profile_from_dict(card["profile"], card["profile_spec"])


def load_finetuned(card_path: str | os.PathLike[str]) -> tuple[torch.nn.Module, dict]:
    """The fine-tuned network (trunk + head, eval mode) of a card, with the card."""
    card_path = Path(card_path)
    card = json.loads(card_path.read_text())
    if card.get("kind") != CARD_KIND:
        raise ModelError(f"{card_path}: not a fine-tuned model card (kind {card.get('kind')!r})")
    weights = card_path.parent / card["weights"]
    if card.get("sha256") and hub.sha256_of(weights) != card["sha256"]:
        raise ModelError(f"{weights}: SHA-256 differs from the card's; the file was changed or replaced")
    trunk, feature_dim = build_trunk(card["trunk"]["name"], card["trunk"]["in_channels"], **card["trunk"]["args"])
    model = torch.nn.Sequential()
    model.add_module("trunk", trunk)
    model.add_module("head", mlp_head(feature_dim, list(card["head"])))
    state = load_file(str(weights))
    model.load_state_dict(state, strict=True)
    return model.eval(), card


@torch.no_grad()
def predict_manifest(
    card_path: str | os.PathLike[str],
    manifest_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    coords: str | None = None,
    on_error: str = "raise",
    batch_size: int = 32,
    device: str = "auto",
    progress: bool = False,
    label: str | None = None,
    n_bootstrap: int = 1000,
) -> Path:
    """Run a fine-tuned model on a manifest with its own preprocessing; the manifest's columns plus predictions.

    Patches of consecutive images and volumes go through the network ``batch_size`` at a time (as ``medfm extract``
    batches them); ``device="auto"`` takes a GPU when there is one. Classification adds ``prob_<class>`` columns and
    ``predicted``; regression ``prediction``; survival ``risk``. When the manifest has the truth (``label``, else
    the card's label column, or its time and event columns) the metrics with bootstrap CIs and n go to
    ``<out stem>.metrics.json`` (:func:`score_predictions`).
    """
    if batch_size < 1:
        raise ModelError(f"batch_size must be at least 1, got {batch_size}")
    model, card = load_finetuned(card_path)
    device = resolve_device(device)
    model = model.to(device)
    profile = _card_profile(card)
    is_2d = isinstance(profile, Profile2D)
    manifest = read_manifest(manifest_path, coords=coords or card.get("coords") or "lps", seeds=not is_2d)
    margin = int(card.get("margin", 0))
    cut = replace(profile, size=tuple(s + 2 * margin for s in profile.size))
    view_size = tuple(card["view_size"])
    spec = card.get("eval_view") or [{"op": "center_crop", "size": list(view_size)}]
    view = build_view(spec, 2 if is_2d else 3)
    rows: list[int] = []
    outputs: list[np.ndarray] = []
    errors: dict[int, str] = {}
    pending: list[tuple[int, np.ndarray]] = []

    def run(n: int) -> None:
        x = torch.from_numpy(np.stack([v for _, v in pending[:n]])).to(device)
        out_batch = model(x).float()
        if card["task"] == "binary":
            p = torch.sigmoid(out_batch[:, 0])
            out_batch = torch.stack([1 - p, p], dim=1)
        elif card["task"] == "multiclass":
            out_batch = out_batch.softmax(dim=1)
        outputs.append(out_batch.cpu().numpy())
        rows.extend(r for r, _ in pending[:n])
        del pending[:n]

    with progress_bar(progress) as bar:
        task = bar.add_task("predicting", total=len(manifest))
        for item in iter_volume_items(manifest, cut, on_error=on_error):
            errors.update(item.errors)
            pending.extend((r, view(p, 0)) for r, p in zip(item.rows, item.patches))
            bar.advance(task, len(item.errors) + len(item.rows))
            while len(pending) >= batch_size:
                run(batch_size)
        if pending:
            run(len(pending))
    values = np.concatenate(outputs) if outputs else np.zeros((0, 1))
    table = manifest.table.iloc[rows].copy()
    if card["task"] in ("binary", "multiclass"):
        classes = card["classes"] or [str(i) for i in range(values.shape[1])]
        for k, name in enumerate(classes):
            table[f"prob_{name}"] = values[:, k]
        table["predicted"] = [classes[k] for k in values.argmax(axis=1)] if len(values) else []
    else:
        table["prediction" if card["task"] == "regression" else "risk"] = values[:, 0]
    order = np.argsort(rows, kind="stable")
    path = write_table(table.iloc[order], out)
    write_errors(manifest.table, errors, out)
    scored = score_predictions(card, table.iloc[order], values[order], label, n_bootstrap)
    metrics_path = metrics_path_of(out)
    if scored is not None:
        write_json({**scored, "predictions": path.name, "model": str(card_path)}, metrics_path)
    elif metrics_path.exists():  # an earlier run's metrics would describe other predictions
        metrics_path.unlink()
    return path


def metrics_path_of(out: str | os.PathLike[str]) -> Path:
    """Where ``predict_manifest`` puts the metrics of predictions written to ``out``: ``<out stem>.metrics.json``."""
    stem = stem_of(out)
    return stem.with_name(stem.name + ".metrics.json")


def score_predictions(
    card: dict, table: pd.DataFrame, values: np.ndarray, label: str | None = None, n_bootstrap: int = 1000
) -> dict | None:
    """The metrics of a card's predictions ``values`` against the truth in ``table`` (rows with a missing label left
    out and counted), each with its bootstrap CI and n; None when the table has no truth column and none was named.
    """
    task = card["task"]
    if task == "survival":
        columns = [card.get("time_column"), card.get("event_column")]
        if label is not None:
            raise ManifestError("--label names a class or value column; a survival model reads its time and event")
        if not all(c in table.columns for c in columns if c) or None in columns:
            return None
        time = pd.to_numeric(table[columns[0]], errors="coerce").to_numpy(dtype=float)
        event = pd.to_numeric(table[columns[1]], errors="coerce").to_numpy(dtype=float)
        kept = np.isfinite(time) & np.isfinite(event)
        target, column = np.stack([time, event], axis=1)[kept], f"{columns[0]}, {columns[1]}"
    else:
        column = label or card.get("label_column")
        if column is None or column not in table.columns:
            if label is not None:
                raise ManifestError(f"--label {label}: no such column in the manifest ({', '.join(table.columns)})")
            return None
        present, missing = clean_labels(table[column], card.get("label_missing"))
        kept = ~missing
        if task == "regression":
            target = pd.to_numeric(present, errors="coerce").to_numpy(dtype=float)[:, None]
            if not np.isfinite(target).all():
                bad = int(np.flatnonzero(~np.isfinite(target[:, 0]))[0])
                raise ManifestError(f"row {present.index[bad]}: {column} {present.iloc[bad]!r} is not a number")
        else:
            classes = card["classes"]
            lookup = {c: i for i, c in enumerate(classes)}
            unknown = [(r, v) for r, v in present.items() if str(v) not in lookup]
            if unknown:
                r, v = unknown[0]
                raise ManifestError(f"row {r}: {column} {v!r} is not one of the model's classes {classes}")
            target = np.array([lookup[str(v)] for v in present], dtype=float)[:, None]
    n_missing = int(np.sum(~kept))
    if len(target) == 0:
        return None
    metrics = metric_intervals(task, values[kept], target, None, n_bootstrap)
    return {"task": task, "truth": column, "n": int(len(target)), "n_missing_labels": n_missing,
            "n_bootstrap": n_bootstrap, "metrics": metrics}  # fmt: skip
