"""``medfm analyze reconstruct``: what does a layer keep of the image? A deep-image-prior inversion.

A small convolutional generator maps a fixed noise tensor to an image; its weights (only they) are optimised with
Adam so that the chosen layer's activations of the generated image match those of the target, with the loss
``‖φ(G(z)) − φ(x)‖² / ‖φ(x)‖²``. The generator's convolutional structure is the prior (Ulyanov et al., deep image
prior): what the reconstruction gets right, the layer kept; what it invents or blurs, the layer threw away. The
generated image lives in the target's own intensity range (a sigmoid mapped onto each channel's min–max), and is
grey (one channel repeated) when the target is a grey image repeated to RGB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from medfm.analyze.figures import save_reconstructions
from medfm.analyze.inputs import open_manifest, read_inputs
from medfm.analyze.models import AnalysisModel, main_stages
from medfm.analyze.report import (
    markdown_table,
    save_figure,
    slug,
    write_csv,
    write_row_errors,
    write_summary,
)
from medfm.data.manifest import Manifest
from medfm.data.outputs import FinishedRows, pyplot
from medfm.errors import ModelError
from medfm.progress import progress_bar
from medfm.seeding import seeded


class _Stop(Exception):
    """Raised by the hook once the chosen layer has run: the rest of the trunk is not needed."""


class PriorGenerator(nn.Module):
    """Fixed noise at 1/2**depth of the size → (upsample ×2, conv 3, batch norm, leaky ReLU) × depth → conv 3 →
    sigmoid, resized to the exact output size."""

    def __init__(
        self, size: tuple[int, ...], out_channels: int = 1, width: int = 16, depth: int = 4, seed: int = 0
    ) -> None:
        super().__init__()
        dims = len(size)
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        generator = torch.Generator().manual_seed(seed)
        start = [max(1, -(-s // 2**depth)) for s in size]
        self.register_buffer("noise", torch.rand((1, width, *start), generator=generator) * 0.1)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                conv(width, width, 3, padding=1, padding_mode="reflect"),
                norm(width),
                nn.LeakyReLU(0.2),
            ]
        layers.append(conv(width, out_channels, 3, padding=1, padding_mode="reflect"))
        self.body = nn.Sequential(*layers)
        self.size = tuple(size)

    def forward(self) -> torch.Tensor:
        """The generated image in [0, 1], (1, out_channels, *size)."""
        out = self.body(self.noise)
        if tuple(out.shape[2:]) != self.size:
            out = F.interpolate(out, size=self.size, mode="bilinear" if len(self.size) == 2 else "trilinear")
        return torch.sigmoid(out)


@dataclass
class Reconstruction:
    """The loss at every iteration and the images (as the model sees them) at the saved iteration counts."""

    losses: np.ndarray
    images: dict[int, np.ndarray]
    layer: str


class _StoppingDict(dict):
    """A dict that stops the forward once the watched layer's output is stored."""

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        super().__setitem__(key, value)
        raise _Stop


def layer_output(model: AnalysisModel, x: torch.Tensor, layer: str) -> torch.Tensor:
    """The named trunk layer's output for ``x``, without running the layers after it."""
    modules = dict(model.trunk.named_modules())
    if layer not in modules:
        raise ModelError(f"layer {layer!r} is not in the trunk; its main stages: {main_stages(model.trunk, x)}")
    store = _StoppingDict()

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        store[layer] = output[0] if isinstance(output, (tuple, list)) else output

    handle = modules[layer].register_forward_hook(hook)
    try:
        model.trunk(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return dict.__getitem__(store, layer).float()


def reconstruct(
    model: AnalysisModel,
    target: torch.Tensor,
    layer: str | None = None,
    iterations: int = 300,
    save_at: tuple[int, ...] = (10, 50, 100, 300),
    lr: float = 0.01,
    seed: int = 0,
) -> Reconstruction:
    """Optimise a :class:`PriorGenerator` so that its image's ``layer`` activations match the target's (1, C, …)."""
    layer = layer or _default_layer(model, target)
    flat = target.flatten(2)
    low = flat.min(dim=2).values.view(1, -1, *([1] * (target.ndim - 2)))
    span = (flat.max(dim=2).values.view_as(low) - low).clamp_min(1e-8)
    unit = (target - low) / span
    grey = bool(torch.allclose(unit, unit[:, :1].expand_as(unit), atol=1e-4))
    with seeded(seed):  # the generator's convolutions start from the seed; the caller's RNG is left alone
        generator = PriorGenerator(tuple(target.shape[2:]), 1 if grey else target.shape[1], seed=seed)
    optimiser = torch.optim.Adam(generator.parameters(), lr=lr)
    frozen = [p for p in model.trunk.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    losses, images = [], {}
    try:
        with torch.no_grad():
            wanted = layer_output(model, target, layer)
        scale = wanted.pow(2).sum().clamp_min(1e-12)
        for step in range(1, iterations + 1):
            optimiser.zero_grad()
            image = low + span * generator().expand(-1, target.shape[1], *([-1] * (target.ndim - 2)))
            loss = (layer_output(model, image, layer) - wanted).pow(2).sum() / scale
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            if step in save_at or step == iterations:
                images[step] = image.detach()[0].numpy().astype(np.float32)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return Reconstruction(np.asarray(losses), images, layer)


def _default_layer(model: AnalysisModel, x: torch.Tensor) -> str:
    """The middle main stage (``layer3`` of a ResNet): deep, yet with some space left to show."""
    stages = main_stages(model.trunk, x)
    return stages[len(stages) // 2]


def run_reconstruct(
    models: list[AnalysisModel],
    manifest: str | os.PathLike[str] | Manifest,
    out: str | os.PathLike[str],
    layer: str | None = None,
    iterations: int = 300,
    save_at: tuple[int, ...] = (10, 50, 100, 300),
    lr: float = 0.01,
    limit: int | None = 4,
    coords: str = "lps",
    on_error: str = "raise",
    seed: int = 0,
    progress: bool = True,
    resume: bool = False,
) -> pd.DataFrame:
    """Reconstruct the first ``limit`` images from each model's ``layer``: PNGs, the loss curves (CSV + PNG).
    ``resume``: images an interrupted run finished (same settings) are not reconstructed again."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    curves, errors, table, used = [], {}, None, {}
    settings = {"manifest": str(getattr(manifest, "source", manifest)), "models": [m.provenance | {"label": m.name}
                for m in models], "layer": layer, "iterations": iterations, "save_at": list(save_at), "lr": lr,
                "limit": limit, "coords": coords, "seed": seed}  # fmt: skip
    finished = FinishedRows(folder / "reconstruct.partial", settings, resume)
    for model in models:
        opened = open_manifest(manifest, model.dims, coords)
        table = opened.table
        inputs = read_inputs(opened, model, limit, on_error, progress)
        errors.update(inputs.errors)
        with progress_bar(progress) as bar:
            task = bar.add_task(f"reconstructing with {model.name}", total=len(inputs) * iterations)
            for i, row in enumerate(inputs.rows):
                kept = finished.get(f"{slug(model.name)}_row{row:05d}", opened.row_digest(row))
                if kept is not None:
                    used[model.name] = kept["layer"]
                    curves.append(pd.DataFrame(kept["curve"]))
                    bar.advance(task, iterations)
                    continue
                result = reconstruct(model, inputs.tensor(i), layer, iterations, save_at, lr, seed)
                used[model.name] = result.layer
                curve = {
                    "model": model.name,
                    "row": row,
                    "image_path": opened.paths[row],
                    "layer": result.layer,
                    "iteration": list(range(1, len(result.losses) + 1)),
                    "loss": [float(v) for v in result.losses],
                }
                curves.append(pd.DataFrame(curve))
                save_reconstructions(
                    folder / f"{slug(model.name)}_row{row:05d}.png",
                    inputs.arrays[i],
                    result.images,
                    f"{model.name} · {result.layer} · row {row}",
                )
                kept = {"layer": result.layer, "curve": curve}
                finished.put(f"{slug(model.name)}_row{row:05d}", kept, opened.row_digest(row))
                bar.advance(task, iterations)
    losses = pd.concat(curves, ignore_index=True)
    write_csv(losses, folder / "reconstruct_loss.csv")
    _plot_losses(losses, folder / "reconstruct_loss.png")
    if table is not None:
        write_row_errors(table, errors, folder, "reconstruct")
    shown_at = sorted({s for s in save_at if s <= iterations} | {iterations})
    summary = (
        losses[losses["iteration"].isin(shown_at)]
        .groupby(["model", "layer", "iteration"], sort=False)["loss"]
        .mean()
        .unstack("iteration")
        .reset_index()
    )
    summary.columns = [f"loss @ {c}" if isinstance(c, (int, np.integer)) else c for c in summary.columns]
    write_summary(
        folder,
        "Deep-image-prior reconstruction",
        [
            "A small conv generator from fixed noise was optimised (Adam) so that its image's activations at the "
            "layer match the target's; relative feature loss ‖φ(G) − φ(x)‖² / ‖φ(x)‖², mean over images:",
            markdown_table(summary, digits=4),
            "![loss](reconstruct_loss.png)",
        ],
        {
            "analysis": "reconstruct",
            "manifest": str(getattr(manifest, "source", manifest)),
            "models": [m.provenance | {"label": m.name, "layer": used.get(m.name)} for m in models],
            "iterations": iterations,
            "save_at": list(save_at),
            "lr": lr,
            "seed": seed,
            "limit": limit,
        },
    )
    finished.close()
    return losses


def _plot_losses(losses: pd.DataFrame, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for (model, row), curve in losses.groupby(["model", "row"], sort=False):
        ax.plot(curve["iteration"], curve["loss"], label=f"{model} · row {row}", alpha=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("relative feature loss")
    ax.grid(alpha=0.3)
    if losses.groupby(["model", "row"]).ngroups <= 12:
        ax.legend(fontsize=7)
    return save_figure(fig, path)
