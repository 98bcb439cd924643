"""The segmentation LightningModule: a U-Net on a registered encoder, Dice + cross-entropy, sliding windows.

Initialisation and freezing follow fine-tuning (``init``: random | published | a registered model | a checkpoint
path; ``freeze``: none | encoder | encoder-until-BLOCK), with ``inflate`` to start a 3D encoder from 2D weights.
Validation and test run on whole cases, with MONAI's ``sliding_window_inference`` (``overlap``, Gaussian blending)
when the case is larger than the window; per-case metrics are gathered over ranks (each case counted once). The
best validation weights are restored at the end of fit; the test mean Dice carries a bootstrap CI over cases (whole
patients when the data has groups). The skeleton is :class:`medfm.train.task.EvaluatedTask`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn

from medfm.errors import ConfigError
from medfm.segment.metrics import case_metrics, summarise
from medfm.segment.model import (
    SegmentationUNet,
    build_unet,
    freeze_encoder,
    infer_logits,
    init_report,
    initialise_encoder,
)
from medfm.train.task import EvaluatedTask, Rows


class SegmentModule(EvaluatedTask):
    """Train a U-Net on a registered encoder to segment the classes of a mask manifest.

    Args:
        class_names: foreground class names in channel order (the CLI links them from ``data.classes``).
        encoder, encoder_args, in_channels: the encoder (a registered 2D trunk such as ``resnet18``, or
            ``resnet3d`` with ``{depth, widen_factor, conv1_t_stride}``, or a registered 3D model).
        decoder_channels: widths of the five decoder stages, deepest first.
        init, min_coverage, inflate: what starts the encoder (the decoder always starts at random).
        freeze: ``none``, ``encoder``, ``encoder-until-BLOCK`` (frozen blocks keep their batch-norm statistics).
        lambda_dice, lambda_ce: weights of MONAI's DiceCELoss terms.
        lr_encoder, lr_decoder: separate learning rates of the encoder and of the decoder (with the head).
        overlap, sw_batch_size: the sliding window of validation, test and prediction (window = data.patch_size).
        patience: early stopping on ``val/dice``; None: none.
        optimizer, weight_decay, momentum, warmup_epochs, final_lr_ratio, n_bootstrap: as
            :class:`medfm.train.task.EvaluatedTask`.
    """

    lr_names = ("lr_encoder", "lr_decoder")

    def __init__(
        self,
        class_names: list[str] | None = None,
        encoder: str = "resnet18",
        encoder_args: dict | None = None,
        in_channels: int = 1,
        decoder_channels: list[int] | None = None,
        init: str = "random",
        min_coverage: float = 0.5,
        inflate: bool = False,
        freeze: str = "none",
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        lr_encoder: float = 1e-3,
        lr_decoder: float = 1e-3,
        overlap: float = 0.5,
        sw_batch_size: int = 4,
        patience: int | None = 20,
        **kwargs: Any,
    ) -> None:
        if not class_names:
            raise ConfigError("name at least one class (data.classes, linked to model.class_names)")
        super().__init__(**kwargs)
        self.class_names = list(class_names)
        self.num_classes = len(class_names) + 1
        self.net: SegmentationUNet = build_unet(encoder, encoder_args, in_channels, self.num_classes, decoder_channels)
        report = initialise_encoder(self.net, encoder, init, min_coverage, inflate)
        self.init_report = init_report(self.net, init, report)
        self.frozen = freeze_encoder(self.net, freeze)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)
        self.monitor, self.mode = "val/dice", "max"
        self.roi_size: tuple[int, ...] | None = None

    def setup(self, stage: str) -> None:
        """Take the sliding window from the data's patch size; check dimensions and channels agree."""
        data = self.attached_data
        if data is None:
            return
        if getattr(data, "dims", self.net.dims) != self.net.dims:
            raise ConfigError(
                f"the encoder {self.hparams.encoder} is {self.net.dims}D but data.profile "
                f"{data.hparams.profile} is {data.dims}D"
            )
        if data.cases is not None and data.in_channels != self.net.in_channels:
            raise ConfigError(
                f"data.profile {data.hparams.profile} gives {data.in_channels}-channel images; set "
                f"model.in_channels: {data.in_channels}"
            )
        if data.class_map.names != tuple(self.class_names):
            raise ConfigError(
                f"model.class_names {self.class_names} differ from data.classes {list(data.class_map.names)}"
            )
        patch = data.hparams.patch_size
        self.roi_size = None if patch is None else tuple(int(s) for s in patch)

    def trunk_module(self) -> nn.Module:
        """The encoder (``lr_encoder``; the decoder and the head train at ``lr_decoder``)."""
        return self.net.encoder

    def frozen_modules(self) -> Iterator[nn.Module]:
        """The encoder's frozen blocks."""
        for path in self.frozen:
            if path != "maxpool" or hasattr(self.net.encoder, "maxpool"):
                yield self.net.encoder.get_submodule(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a batch of images or patches."""
        return self.net(x)

    def infer(self, image: torch.Tensor) -> torch.Tensor:
        """Class logits of whole images (B, C, *S): a sliding window when they are larger than the window."""
        return infer_logits(self.net, image, self.roi_size, self.hparams.overlap, self.hparams.sw_batch_size)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Dice + cross-entropy of a batch of patches."""
        loss = self.loss_fn(self(batch["image"]).float(), batch["label"])
        self.log_train_loss(loss, len(batch["image"]))
        return loss

    def evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, Any]:
        """Loss and per-class metrics of one whole case (surface distances on the test cases only)."""
        logits = self.infer(batch["image"]).float()
        pred = logits.argmax(dim=1)[0].cpu()
        spacing = batch["spacing"][0].tolist()
        metrics = case_metrics(pred, batch["label"][0, 0].cpu(), self.num_classes, spacing, distances=stage == "test")
        return {
            "index": batch["index"],
            "loss": self.loss_fn(logits, batch["label"]),
            **{name: np.asarray(values, dtype=float)[None] for name, values in metrics.items()},
        }

    def validation_metrics(self, rows: Rows) -> dict[str, float]:
        """The mean Dice, overall and per class, of the validation cases."""
        summary = summarise(rows.values, self.class_names, n_bootstrap=0)
        return {k: v["value"] for k, v in summary.items() if k == "dice" or k.startswith("dice/")}

    def test_metrics(self, rows: Rows) -> dict[str, dict]:
        """Per-class Dice, HD95 and ASSD (mm), the mean Dice with its bootstrap CI; the per-case values are kept
        in ``test_cases``."""
        self.test_cases = {"index": rows.index.tolist(), **{k: v.tolist() for k, v in rows.values.items()}}
        return summarise(rows.values, self.class_names, self.row_groups(rows.index), self.hparams.n_bootstrap)
