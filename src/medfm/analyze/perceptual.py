"""``medfm analyze perceptual``: an LPIPS-style distance read off a model's own intermediate layers.

At each chosen layer the activations of both images are unit-normalised along the channels at every position,
their squared difference is summed over channels and averaged over positions; the distance is the mean over
layers (LPIPS with equal, unlearned layer weights). The default layers are the trunk's main stages
(:func:`medfm.analyze.models.main_stages`). With a pairs file that has a reference column (a human rating, a
dose, a known distortion strength), the Spearman rank correlation of the distance with it says how well the
model works as a perceptual metric for that data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from medfm.analyze.inputs import read_pair_inputs
from medfm.analyze.models import AnalysisModel, main_stages, tap_layers
from medfm.analyze.report import interval_text, markdown_table, write_csv, write_row_errors, write_summary
from medfm.errors import MedfmError
from medfm.evaluate.metrics import bootstrap_values, percentile_interval

EPS = 1e-10


@dataclass
class PerceptualResult:
    """Distances per pair and model, the Spearman correlations (when a reference was given), the folder."""

    table: pd.DataFrame
    correlations: pd.DataFrame
    folder: Path | None


def _unit_channels(x: torch.Tensor) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)


@torch.no_grad()
def layer_activations(model: AnalysisModel, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
    """Outputs of the named trunk layers for a batch (B, C, …)."""
    with tap_layers(model.trunk, layers) as store:
        model.trunk(x)
        return {name: store[name].float() for name in layers}


@torch.no_grad()
def perceptual_distance(
    model: AnalysisModel, a: torch.Tensor, b: torch.Tensor, layers: list[str] | None = None, chunk: int = 8
) -> np.ndarray:
    """Distance of each row of ``a`` to the same row of ``b`` (both (B, C, …) as the model sees them)."""
    if a.shape != b.shape:
        raise MedfmError(f"the two inputs have different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    layers = list(layers or main_stages(model.trunk, a))
    out = []
    for start in range(0, len(a), chunk):
        fa = layer_activations(model, a[start : start + chunk], layers)
        fb = layer_activations(model, b[start : start + chunk], layers)
        per_layer = []
        for name in layers:
            diff = (_unit_channels(fa[name]) - _unit_channels(fb[name])).pow(2).sum(dim=1)
            per_layer.append(diff.flatten(1).mean(dim=1) if diff.ndim > 1 else diff)
        out.append(torch.stack(per_layer).mean(dim=0))
    return torch.cat(out).numpy().astype(np.float64)


def spearman_interval(distance: np.ndarray, reference: np.ndarray, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Spearman ρ of distance with reference, its p-value and a bootstrap 95% CI over pairs."""
    d, r = np.asarray(distance, dtype=float), np.asarray(reference, dtype=float)
    keep = np.isfinite(d) & np.isfinite(r)
    d, r = d[keep], r[keep]
    if len(d) < 3 or np.ptp(r) == 0 or np.ptp(d) == 0:
        return {
            "spearman": float("nan"),
            "p_value": float("nan"),
            "low": float("nan"),
            "high": float("nan"),
            "n": len(d),
        }
    rho, p = spearmanr(d, r)

    def one(idx: np.ndarray) -> float:
        return float(spearmanr(d[idx], r[idx])[0]) if np.ptp(d[idx]) > 0 and np.ptp(r[idx]) > 0 else np.nan

    ci = percentile_interval(float(rho), bootstrap_values(one, len(d), None, n_bootstrap, seed), n=len(d))
    return {"spearman": ci.value, "p_value": float(p), "low": ci.low, "high": ci.high, "n": len(d)}


def run_perceptual(
    models: list[AnalysisModel],
    pairs: str | os.PathLike[str] | pd.DataFrame,
    out: str | os.PathLike[str] | None = None,
    layers: list[str] | None = None,
    reference: str | None = None,
    limit: int | None = None,
    coords: str = "lps",
    on_error: str = "raise",
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> PerceptualResult:
    """Distances of every pair for each model; with ``reference``, Spearman ρ against that column (with CI)."""
    frames, errors, correlations, table = [], {}, [], None
    for model in models:
        table, a, b = read_pair_inputs(pairs, model, limit, on_error, coords)
        if reference is not None and reference not in table.columns:
            raise MedfmError(f"pairs: no reference column {reference!r}; it has {list(table.columns)}")
        errors.update(a.errors)
        chosen = list(layers or main_stages(model.trunk, a.tensor(0)))
        frame = a.table.copy()
        frame.insert(0, "row", a.rows)
        frame.insert(0, "model", model.name)
        frame["distance"] = perceptual_distance(model, a.batch(), b.batch(), chosen)
        frame["layers"] = " ".join(chosen)
        frames.append(frame)
        if reference is not None:
            stats = spearman_interval(frame["distance"].to_numpy(), pd.to_numeric(frame[reference], errors="coerce"))
            correlations.append({"model": model.name, "reference": reference, **stats})
    per_pair = pd.concat(frames, ignore_index=True)
    correlation_table = pd.DataFrame(correlations)
    folder = None
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        write_csv(per_pair, folder / "perceptual.csv")
        sections = [
            "LPIPS-style distance from each model's own layers (channels unit-normalised, squared differences "
            "summed over channels, averaged over positions and over the layers): 0 for identical inputs.",
            markdown_table(
                per_pair.groupby("model", sort=False)["distance"]
                .agg(["count", "mean", "median", "min", "max"])
                .reset_index()
            ),
        ]
        if len(correlation_table):
            write_csv(correlation_table, folder / "perceptual_spearman.csv")
            shown = correlation_table.assign(
                rho=[
                    interval_text(r, lo, hi, n=n)
                    for r, lo, hi, n in correlation_table[["spearman", "low", "high", "n"]].values
                ]
            )
            sections.append(
                f"Spearman rank correlation of the distance with `{reference}` (bootstrap 95% CI over pairs):\n\n"
                + markdown_table(shown[["model", "rho", "p_value", "n"]])
            )
        if table is not None:
            write_row_errors(table, errors, folder, "perceptual")
        write_summary(
            folder,
            "Perceptual distance",
            sections,
            {
                "analysis": "perceptual",
                "pairs": str(pairs) if not isinstance(pairs, pd.DataFrame) else "table",
                "models": [m.provenance | {"label": m.name} for m in models],
                "layers": layers,
                "reference": reference,
            },
        )
    return PerceptualResult(per_pair, correlation_table, folder)
