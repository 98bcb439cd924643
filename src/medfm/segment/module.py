"""The segmentation LightningModule: a U-Net on a registered encoder, Dice + cross-entropy, sliding windows.

Initialisation and freezing follow fine-tuning (``init``: random | published | a registered model | a checkpoint
path; ``freeze``: none | encoder | encoder-until-BLOCK), with ``inflate`` to start a 3D encoder from 2D weights.
Validation and test run on whole cases, with MONAI's ``sliding_window_inference`` (``overlap``, Gaussian blending)
when the case is larger than the window; per-case metrics are gathered over ranks (each case counted once). The
best validation weights are restored at the end of fit (:class:`medfm.train.callbacks.BestWeights`); the test mean
Dice carries a bootstrap CI over cases (whole patients when the data has groups).
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from monai.losses import DiceCELoss

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
from medfm.train.callbacks import fit_callbacks
from medfm.train.distributed import gather, world
from medfm.train.optim import grouped_optimizer


class SegmentModule(pl.LightningModule):
    """Train a U-Net on a registered encoder to segment the classes of a mask manifest.

    Args:
        class_names: foreground class names in channel order (the CLI links them from ``data.classes``).
        encoder, encoder_args, in_channels: the encoder (a registered 2D trunk such as ``resnet18``, or
            ``resnet3d`` with ``{depth, widen_factor, conv1_t_stride}``, or a registered 3D model).
        decoder_channels: widths of the five decoder stages, deepest first.
        init, min_coverage, inflate: what starts the encoder (the decoder always starts at random).
        freeze: ``none``, ``encoder``, ``encoder-until-BLOCK`` (frozen blocks keep their batch-norm statistics).
        lambda_dice, lambda_ce: weights of MONAI's DiceCELoss terms.
        lr_encoder, lr_decoder: separate learning rates (warm-up + cosine stepped every step).
        overlap, sw_batch_size: the sliding window of validation, test and prediction (window = data.patch_size).
        patience: early stopping on ``val/dice``; None: none.
        n_bootstrap: resamples of the test Dice's confidence interval.
    """

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
        optimizer: str = "adamw",
        lr_encoder: float = 1e-3,
        lr_decoder: float = 1e-3,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        warmup_epochs: float = 0.0,
        final_lr_ratio: float = 0.0,
        overlap: float = 0.5,
        sw_batch_size: int = 4,
        patience: int | None = 20,
        n_bootstrap: int = 1000,
    ) -> None:
        super().__init__()
        if not class_names:
            raise ConfigError("name at least one class (data.classes, linked to model.class_names)")
        self.save_hyperparameters()
        self.class_names = list(class_names)
        self.num_classes = len(class_names) + 1
        self.net: SegmentationUNet = build_unet(encoder, encoder_args, in_channels, self.num_classes, decoder_channels)
        report = initialise_encoder(self.net, encoder, init, min_coverage, inflate)
        self.init_report = init_report(self.net, init, report)
        self.frozen = freeze_encoder(self.net, freeze)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)
        self.monitor, self.mode = "val/dice", "max"
        self.history: list[dict[str, float]] = []
        self.best: dict[str, float] = {}
        self.test_results: dict[str, dict[str, float]] = {}
        self.roi_size: tuple[int, ...] | None = None
        self._outputs: dict[str, list[dict[str, torch.Tensor]]] = {"val": [], "test": []}

    def setup(self, stage: str) -> None:
        """Take the sliding window from the data's patch size; check dimensions and channels agree."""
        data = getattr(getattr(self, "_trainer", None), "datamodule", None)
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

    def on_train_epoch_start(self) -> None:
        """Frozen blocks stay in eval mode: their batch-norm statistics do not drift."""
        for path in self.frozen:
            if path != "maxpool" or hasattr(self.net.encoder, "maxpool"):
                self.net.encoder.get_submodule(path).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a batch of images or patches."""
        return self.net(x)

    def infer(self, image: torch.Tensor) -> torch.Tensor:
        """Class logits of whole images (B, C, *S): a sliding window when they are larger than the window."""
        return infer_logits(self.net, image, self.roi_size, self.hparams.overlap, self.hparams.sw_batch_size)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Dice + cross-entropy of a batch of patches."""
        loss = self.loss_fn(self(batch["image"]).float(), batch["label"])
        self.log(
            "train/loss",
            loss,
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            sync_dist=True,
            batch_size=len(batch["image"]),
        )
        return loss

    def _collect(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        logits = self.infer(batch["image"]).float()
        loss = self.loss_fn(logits, batch["label"])
        pred = logits.argmax(dim=1)[0].cpu()
        spacing = batch["spacing"][0].tolist()
        metrics = case_metrics(pred, batch["label"][0, 0].cpu(), self.num_classes, spacing, distances=stage == "test")
        values = np.stack([metrics[m] for m in sorted(metrics)])  # (metrics, classes)
        self._outputs[stage].append(
            {
                "loss": loss.detach()[None].float(),
                "values": torch.from_numpy(values)[None].to(self.device),
                "index": batch["index"].detach(),
            }
        )

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Metrics of one validation case."""
        self._collect(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Metrics (with surface distances) of one test case."""
        self._collect(batch, "test")

    def _gathered(self, stage: str) -> tuple[dict[str, np.ndarray], float, np.ndarray]:
        """Per-case metrics of a stage over every rank, each case once: metric → (cases, classes)."""
        parts = self._outputs[stage]
        self._outputs[stage] = []
        values = torch.cat([p["values"] for p in parts])
        index = torch.cat([p["index"] for p in parts])
        loss = torch.cat([p["loss"] for p in parts]).mean()
        if world()[1] > 1:
            values, index = gather(values.contiguous()), gather(index.contiguous())
            loss = gather(loss[None]).mean()
        entries, first = np.unique(index.cpu().numpy(), return_index=True)
        values = values.cpu().numpy()[first]
        names = ("assd", "dice", "hd95") if stage == "test" else ("dice",)
        return {name: values[:, k] for k, name in enumerate(names)}, float(loss), entries

    def on_validation_epoch_end(self) -> None:
        """Log the validation loss and mean Dice (overall and per class); keep them in ``history``."""
        if not self._outputs["val"]:
            return
        per_case, loss, _ = self._gathered("val")
        summary = summarise(per_case, self.class_names, n_bootstrap=0)
        metrics = {"loss": loss, "dice": summary["dice"]["value"]}
        metrics.update({k: v["value"] for k, v in summary.items() if k.startswith("dice/")})
        for name, value in metrics.items():
            self.log(f"val/{name}", float(value), prog_bar=name in ("loss", "dice"))
        if not self.trainer.sanity_checking:
            self.history.append({"epoch": self.current_epoch, **{f"val/{k}": float(v) for k, v in metrics.items()}})

    def on_train_epoch_end(self) -> None:
        """Add the epoch's training loss to its row of ``history``."""
        train_loss = self.trainer.callback_metrics.get("train/loss_epoch")
        if self.history and self.history[-1]["epoch"] == self.current_epoch and train_loss is not None:
            self.history[-1]["train/loss"] = float(train_loss)

    def on_test_epoch_end(self) -> None:
        """Test metrics per class (Dice, HD95, ASSD in mm) and the mean Dice with its bootstrap CI."""
        per_case, _, entries = self._gathered("test")
        data = getattr(getattr(self, "_trainer", None), "datamodule", None)
        codes = getattr(data, "group_codes", None)
        groups = None if codes is None else np.asarray(codes)[entries]
        self.test_results = summarise(per_case, self.class_names, groups, self.hparams.n_bootstrap)
        self.test_cases = {"index": entries.tolist(), **{k: v.tolist() for k, v in per_case.items()}}
        self.log("test/dice", float(self.test_results["dice"]["value"]))

    def configure_optimizers(self) -> dict:
        """Separate learning rates for encoder and decoder; warm-up + cosine stepped every optimiser step."""
        hp = self.hparams
        decoder = [*self.net.decoder.parameters(), *self.net.head.parameters()]
        groups = [
            {"params": [p for p in self.net.encoder.parameters() if p.requires_grad], "lr": hp.lr_encoder},
            {"params": decoder, "lr": hp.lr_decoder},
        ]
        return grouped_optimizer(self.trainer, groups, hp, hp.lr_decoder)

    def configure_callbacks(self) -> list[Callback]:
        """Best-weight restoring, and early stopping on the validation Dice when ``patience`` is set."""
        return fit_callbacks(self.monitor, self.mode, self.hparams.patience)
