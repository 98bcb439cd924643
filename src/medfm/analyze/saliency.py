"""``medfm analyze saliency``: where in the image do the features (or a fine-tuned head's output) come from?

* **occlusion** (every model): a window filled with the image's mean slides over the input; the map is the
  change of the trunk's features, ``‖f(x) − f(x_occluded)‖ / ‖f(x)‖``, averaged over the windows that cover a
  pixel. It is captum's ``Occlusion`` with a forward function returning minus that distance (captum attributes
  ``F(x) − F(x_occluded)``, and F(x) = 0), so no attribution arithmetic is written here.
* **gradcam** and **integrated gradients** (fine-tuned model cards): captum's ``LayerGradCam`` at the trunk's last
  main stage (ReLU'd, upsampled to the input) and ``IntegratedGradients`` from a mean-image baseline (absolute
  values summed over channels), both of the head's output: the logit of a binary head, the chosen (default: the
  predicted) class of a multi-class head, the value of a regression or survival head.

**Attentive diffusion** (the SSL-transfer study's figure) is the share of pixels above the map's mean: low when the
model attends to a small region, near 0.5 when its attention is spread out.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medfm.analyze.figures import save_overlays
from medfm.analyze.inputs import open_manifest, read_inputs
from medfm.analyze.models import AnalysisModel, main_stages
from medfm.analyze.report import (
    interval_text,
    markdown_table,
    slug,
    write_csv,
    write_row_errors,
    write_summary,
)
from medfm.analyze.similarity import mean_interval
from medfm.data.manifest import Manifest
from medfm.data.outputs import FinishedRows
from medfm.errors import ConfigError, MedfmError
from medfm.progress import progress_bar

METHODS = ("occlusion", "gradcam", "integrated_gradients")


@dataclass
class SaliencyResult:
    """Per image and method: attentive diffusion and the map's peak; the summary per model and method."""

    table: pd.DataFrame
    summary: pd.DataFrame
    folder: Path


def default_window(side: int) -> int:
    """The divisor of ``side`` nearest to a sixth of it (windows then tile the input exactly)."""
    divisors = [d for d in range(1, side + 1) if side % d == 0 and d < side] or [side]
    return min(divisors, key=lambda d: (abs(d - side / 6), d))


def _per_axis(value: int | tuple[int, ...] | None, shape: tuple[int, ...], default: list[int]) -> tuple[int, ...]:
    if value is None:
        return tuple(default)
    values = (value,) * len(shape) if isinstance(value, int) else tuple(value)
    if len(values) != len(shape) or min(values) < 1:
        raise ConfigError(f"window/stride {value} must be one positive size or {len(shape)} of them")
    return tuple(min(v, s) for v, s in zip(values, shape))


def occlusion_map(
    model: AnalysisModel,
    x: torch.Tensor,
    window: int | tuple[int, ...] | None = None,
    stride: int | tuple[int, ...] | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Feature-change occlusion map of one input (1, C, …), spatial shape; pixels no window covers get 0."""
    from captum.attr import Occlusion

    spatial = tuple(x.shape[2:])
    window = _per_axis(window, spatial, [default_window(s) for s in spatial])
    stride = _per_axis(stride, spatial, list(window))
    with torch.no_grad():
        reference = model.trunk(x).float().flatten(1)
    norm = reference.norm().clamp_min(1e-12)

    def negative_change(batch: torch.Tensor) -> torch.Tensor:
        return -(model.trunk(batch).float().flatten(1) - reference).norm(dim=1) / norm

    baseline = x.mean(dim=tuple(range(2, x.ndim)), keepdim=True).expand_as(x)
    attribution = Occlusion(negative_change).attribute(
        x,
        sliding_window_shapes=(x.shape[1], *window),
        strides=(x.shape[1], *stride),
        baselines=baseline,
        perturbations_per_eval=batch_size,
    )
    return np.nan_to_num(attribution[0].mean(dim=0).detach().numpy().astype(np.float64), nan=0.0)


def head_target(model: AnalysisModel, x: torch.Tensor, target: int | str | None = None) -> int:
    """The output index explained: a binary/regression/survival head's only output; for multi-class the class
    named or numbered by ``target``, else the predicted one."""
    card = model.card or {}
    classes = [str(c) for c in card.get("classes") or []]
    if card.get("task") != "multiclass":
        return 0
    if target is None:
        with torch.no_grad():
            return int(model.network()(x).argmax(dim=1)[0])
    if str(target) in classes:
        return classes.index(str(target))
    try:
        index = int(target)
    except ValueError:
        raise MedfmError(f"--target {target!r} is not a class of this model; classes: {classes}") from None
    width = len(classes) or int(model.network()(x).shape[1])
    if not 0 <= index < width:
        raise MedfmError(f"--target {index} is out of range; the head has {width} outputs")
    return index


def gradcam_map(model: AnalysisModel, x: torch.Tensor, target: int, layer: str | None = None) -> np.ndarray:
    """Grad-CAM (captum) of the head's output ``target`` at a trunk layer (default its last main stage)."""
    from captum.attr import LayerAttribution, LayerGradCam

    network = model.network()
    name = layer or main_stages(model.trunk, x)[-1]
    module = dict(model.trunk.named_modules()).get(name)
    if module is None:
        raise MedfmError(f"layer {name!r} is not in the trunk; e.g. {main_stages(model.trunk, x)}")
    attribution = LayerGradCam(network, module).attribute(x, target=target, relu_attributions=True)
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    upsampled = LayerAttribution.interpolate(attribution, tuple(x.shape[2:]), interpolate_mode=mode)
    return upsampled[0, 0].detach().numpy().astype(np.float64)


def integrated_gradients_map(model: AnalysisModel, x: torch.Tensor, target: int, steps: int = 32) -> np.ndarray:
    """|Integrated gradients| (captum) of the head's output ``target``, summed over channels; mean-image baseline."""
    from captum.attr import IntegratedGradients

    baseline = x.mean(dim=tuple(range(2, x.ndim)), keepdim=True).expand_as(x).contiguous()
    attribution = IntegratedGradients(model.network()).attribute(
        x, baselines=baseline, target=target, n_steps=steps, internal_batch_size=min(steps, 16)
    )
    return attribution[0].abs().sum(dim=0).detach().numpy().astype(np.float64)


def attentive_diffusion(saliency: np.ndarray) -> float:
    """The share of pixels (voxels) above the map's mean; NaN for a constant map (e.g. a Grad-CAM with no positive
    evidence for the target), which attends nowhere."""
    saliency = np.asarray(saliency, dtype=np.float64)
    if np.ptp(saliency) <= 1e-12 * max(1.0, float(np.abs(saliency).max())):
        return float("nan")
    return float(np.mean(saliency > saliency.mean()))


def saliency_maps(
    model: AnalysisModel,
    x: torch.Tensor,
    methods: tuple[str, ...],
    window: int | tuple[int, ...] | None = None,
    stride: int | tuple[int, ...] | None = None,
    target: int | str | None = None,
    layer: str | None = None,
    steps: int = 32,
    batch_size: int = 16,
) -> dict[str, np.ndarray]:
    """The maps of one input (1, C, …) by each method; head methods only for models with a head."""
    maps: dict[str, np.ndarray] = {}
    explain = model.head is not None and bool({"gradcam", "integrated_gradients"} & set(methods))
    index = head_target(model, x, target) if explain else 0  # a bad --target fails before any work
    if "occlusion" in methods:
        maps["occlusion"] = occlusion_map(model, x, window, stride, batch_size)
    if explain:
        if "gradcam" in methods:
            maps["gradcam"] = gradcam_map(model, x, index, layer)
        if "integrated_gradients" in methods:
            maps["integrated_gradients"] = integrated_gradients_map(model, x, index, steps)
    return maps


def run_saliency(
    models: list[AnalysisModel],
    manifest: str | os.PathLike[str] | Manifest,
    out: str | os.PathLike[str],
    methods: tuple[str, ...] | None = None,
    window: int | tuple[int, ...] | None = None,
    stride: int | tuple[int, ...] | None = None,
    target: int | str | None = None,
    layer: str | None = None,
    steps: int = 32,
    limit: int | None = None,
    coords: str = "lps",
    on_error: str = "raise",
    n_bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
    overlays: bool = True,
    progress: bool = True,
    resume: bool = False,
) -> SaliencyResult:
    """Saliency maps of every image for each model: CSV of attentive diffusion and peaks, overlays as PNG.

    ``methods=None``: occlusion for every model, and Grad-CAM and integrated gradients for those with a head.
    ``resume``: images an interrupted run finished (same settings) are not computed again.
    """
    asked = methods is not None
    methods = tuple(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown saliency method(s) {unknown}; allowed {list(METHODS)}")
    heads = [m for m in methods if m != "occlusion"]
    if asked and heads and not any(m.head is not None for m in models):
        warnings.warn(
            f"{', '.join(heads)} explain a fine-tuned head: give a model.json of `medfm finetune fit`; "
            "only occlusion is computed for trunks",
            stacklevel=2,
        )
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    records, errors, table = [], {}, None
    settings = {"manifest": str(getattr(manifest, "source", manifest)), "models": [m.provenance | {"label": m.name}
                for m in models], "methods": methods, "window": window, "stride": stride, "target": target,
                "layer": layer, "steps": steps, "limit": limit, "coords": coords, "overlays": overlays}  # fmt: skip
    finished = FinishedRows(folder / "saliency.partial", settings, resume)
    for model in models:
        opened = open_manifest(manifest, model.dims, coords)
        table = opened.table
        inputs = read_inputs(opened, model, limit, on_error, progress)
        errors.update(inputs.errors)
        with progress_bar(progress) as bar:
            task = bar.add_task(f"saliency of {model.name}", total=len(inputs))
            for i, row in enumerate(inputs.rows):
                kept = finished.get(f"{slug(model.name)}_row{row:05d}", opened.row_digest(row))
                if kept is not None:
                    records.extend(kept["records"])
                    bar.advance(task)
                    continue
                x = inputs.tensor(i)
                maps = saliency_maps(model, x, methods, window, stride, target, layer, steps, batch_size)
                mine = []
                for method, saliency in maps.items():
                    peak = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
                    mine.append(
                        {
                            "model": model.name,
                            "row": row,
                            "image_path": opened.paths[row],
                            "method": method,
                            "attentive_diffusion": attentive_diffusion(saliency),
                            "peak": " ".join(str(int(p)) for p in peak),
                            "map_max": float(saliency.max()),
                            "map_mean": float(saliency.mean()),
                        }
                    )
                if overlays and maps:
                    name = f"{slug(model.name)}_row{row:05d}.png"
                    save_overlays(folder / "overlays" / name, inputs.arrays[i], maps, f"{model.name} · row {row}")
                records.extend(mine)
                finished.put(f"{slug(model.name)}_row{row:05d}", {"records": mine}, opened.row_digest(row))
                bar.advance(task)
    per_image = pd.DataFrame(records)
    summary_rows = []
    for (model_name, method), group in per_image.groupby(["model", "method"], sort=False):
        ci = mean_interval(group["attentive_diffusion"].to_numpy(), n_bootstrap, seed=seed)
        summary_rows.append(
            {"model": model_name, "method": method, "attentive_diffusion": ci.value, "low": ci.low, "high": ci.high}
        )
        summary_rows[-1]["n"] = int(np.isfinite(group["attentive_diffusion"]).sum())  # constant maps left out
    summary = pd.DataFrame(summary_rows)
    write_csv(per_image, folder / "saliency.csv")
    write_csv(summary, folder / "saliency_summary.csv")
    if table is not None:
        write_row_errors(table, errors, folder, "saliency")
    shown = summary.assign(
        diffusion=[
            interval_text(m, lo, hi, n=n)
            for m, lo, hi, n in summary[["attentive_diffusion", "low", "high", "n"]].values
        ]
    )
    spatial = "pixels" if models[0].dims == 2 else "voxels"
    write_summary(
        folder,
        "Saliency",
        [
            f"Attentive diffusion: the share of {spatial} above the map's mean (mean over images, "
            f"{n_bootstrap}-resample bootstrap 95% CI). Occlusion maps show the relative change of the trunk's "
            "features when a window is filled with the image mean; Grad-CAM and integrated gradients explain a "
            "fine-tuned head's output. Overlays in `overlays/` (3D: axial, coronal and sagittal slices through the "
            "patch centre).",
            markdown_table(shown[["model", "method", "diffusion", "n"]]),
        ],
        {
            "analysis": "saliency",
            "manifest": str(getattr(manifest, "source", manifest)),
            "models": [m.provenance | {"label": m.name} for m in models],
            "methods": list(methods),
            "window": window,
            "stride": stride,
            "target": target,
            "layer": layer,
            "steps": steps,
            "limit": limit,
        },
    )
    finished.close()
    return SaliencyResult(per_image, summary, folder)
