"""Segmentation metrics per case and class (MONAI), in millimetres, and their summary with a bootstrap CI.

Per case and foreground class: Dice (``compute_dice``), the 95th-percentile Hausdorff distance (``compute_hausdorff
_distance``, percentile 95) and the average symmetric surface distance (``compute_average_surface_distance``), with
the voxel spacing passed in array-axis order so distances are millimetres on anisotropic grids. Conventions: a class
absent from both the reference and the prediction has no score (NaN, left out of means); absent from the reference
but predicted, Dice 0; distances need both masks non-empty (else NaN). A case's Dice is the mean over its scored
classes; the headline is the mean over cases with a percentile bootstrap CI over cases (whole patients when grouped).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

from medfm.evaluate.metrics import bootstrap_values, percentile_interval

METRICS = ("dice", "hd95", "assd")


def one_hot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(*S) class indices → (1, K, *S) one-hot float."""
    out = torch.nn.functional.one_hot(label.long(), num_classes).movedim(-1, 0)
    return out[None].float()


def case_metrics(
    pred: torch.Tensor | np.ndarray,
    label: torch.Tensor | np.ndarray,
    num_classes: int,
    spacing: Sequence[float] | None = None,
    distances: bool = True,
) -> dict[str, np.ndarray]:
    """Dice, HD95 and ASSD (mm) per foreground class of one case: arrays of length ``num_classes - 1``.

    ``pred`` and ``label`` are class-index maps of the same shape; ``spacing`` is mm per voxel in their axis order.
    """
    pred, label = torch.as_tensor(np.asarray(pred)), torch.as_tensor(np.asarray(label))
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and reference {tuple(label.shape)} differ in shape")
    p, y = one_hot(pred, num_classes), one_hot(label, num_classes)
    in_pred = p[0, 1:].flatten(1).any(dim=1).numpy()
    in_ref = y[0, 1:].flatten(1).any(dim=1).numpy()
    dice = compute_dice(p, y, include_background=False, ignore_empty=False)[0].double().numpy()
    dice[~in_pred & ~in_ref] = np.nan
    out = {"dice": dice}
    if distances:
        both = in_pred & in_ref
        hd = np.full(num_classes - 1, np.nan)
        assd = np.full(num_classes - 1, np.nan)
        if both.any():
            spacing_arg = None if spacing is None else [float(s) for s in spacing]
            with warnings.catch_warnings():  # MONAI warns about empty classes; they are NaN here anyway
                warnings.simplefilter("ignore")
                hd = compute_hausdorff_distance(p, y, percentile=95, spacing=spacing_arg)[0].double().numpy()
                assd = compute_average_surface_distance(p, y, symmetric=True, spacing=spacing_arg)[0].double().numpy()
            hd[~both], assd[~both] = np.nan, np.nan
        out["hd95"], out["assd"] = hd, assd
    return out


def _nanmean(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def summarise(
    per_case: dict[str, np.ndarray],
    names: Sequence[str],
    groups: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Means over cases (per class, and Dice over classes) with a bootstrap CI of the headline mean Dice.

    ``per_case``: metric → (cases, classes) arrays. Returns ``{"dice": interval, "dice/NAME": …, "hd95/NAME": …}``,
    intervals as :meth:`Interval.to_dict` (per-class entries carry the mean and the number of scored cases).
    """
    dice = per_case["dice"]
    case_dice = np.asarray(_nanmean(dice, axis=1)) if len(dice) else np.zeros(0)
    scored = np.flatnonzero(np.isfinite(case_dice))
    values = case_dice[scored]
    point = float(values.mean()) if len(values) else float("nan")
    sub_groups = None if groups is None else np.asarray(groups)[scored]
    samples = bootstrap_values(lambda idx: float(values[idx].mean()), len(values), sub_groups, n_bootstrap, seed)
    results: dict[str, dict[str, float]] = {"dice": percentile_interval(point, samples).to_dict()}
    for metric, table in per_case.items():
        for k, name in enumerate(names):
            column = table[:, k] if len(table) else np.zeros(0)
            finite = column[np.isfinite(column)]
            results[f"{metric}/{name}"] = {
                "value": float(finite.mean()) if len(finite) else float("nan"),
                "sd": float(finite.std()) if len(finite) else float("nan"),
                "n": int(len(finite)),
            }
    results["n"] = {"value": float(len(values)), "cases": int(len(case_dice))}
    return results
