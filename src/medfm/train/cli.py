"""The LightningCLI shared by ``medfm pretrain`` and ``medfm finetune``: defaults, resume and launch.

``fit --config run.yaml [--trainer.devices 2 …]`` trains; ``--print_config`` shows the resolved config, which is
also saved beside the checkpoints; ``--ckpt_path last`` resumes the newest ``last.ckpt`` under the run's
``default_root_dir``.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from medfm.train.distributed import GlobalBatchNormSync, runs_on_cpu


def find_last_checkpoint(root: str | Path) -> Path | None:
    """The newest ``last.ckpt`` under a run folder, or None."""
    found = sorted(Path(root).rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def default_loggers(root: str | Path) -> list:
    """A CSV logger always (metrics.csv per run), and TensorBoard too when it is installed."""
    loggers: list = [CSVLogger(root, name="logs")]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(root, name="logs", version=loggers[0].version))
    return loggers


def default_precision(accelerator: str) -> str:
    """bf16 mixed precision where the GPU has it, 16-bit mixed on older GPUs, full precision on the CPU."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


class MedfmCLI(LightningCLI):
    """LightningCLI with medfm's defaults: CSV (+TensorBoard) logging, last checkpoints, resumable runs,
    mixed precision where the device has it, global batch norm on CPU DDP."""

    default_root = "outputs/run"

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        root = config.get("default_root_dir") or self.default_root
        config["default_root_dir"] = root
        if config.get("logger") in (None, True):
            config["logger"] = default_loggers(root)
        if config.get("precision") is None:
            config["precision"] = default_precision(str(config.get("accelerator") or "auto"))
        if config.get("sync_batchnorm") and runs_on_cpu(config.get("accelerator")):
            plugins = config.get("plugins")
            plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [] if plugins is None else [plugins]
            config["plugins"] = [*plugins, GlobalBatchNormSync()]
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        """``--ckpt_path last`` resumes the newest last.ckpt of the run folder (a fresh start if there is none)."""
        fit = self.config_init["fit"]
        if fit.get("ckpt_path") == "last":
            last = find_last_checkpoint(self.trainer.default_root_dir)
            fit["ckpt_path"] = str(last) if last else None
            print(f"resuming from {last}" if last else "no last.ckpt found: starting from scratch")


class EvaluatedCLI(MedfmCLI):
    """After fit: test the restored best weights once, then write results, curves and the model card (rank 0)."""

    def after_fit(self) -> None:
        """Test and write the run's outputs; an interrupted fit writes nothing."""
        trainer = self.trainer
        if trainer.interrupted:
            return
        trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        # Every rank asks: under DDP, Trainer.log_dir broadcasts rank 0's folder (a collective call).
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            print(self.write_outputs(folder))

    def write_outputs(self, folder: Path) -> str:
        """Write the run's outputs into ``folder``; returns the line printed after fit."""
        raise NotImplementedError(f"{type(self).__name__} must say how its runs write their outputs")


def fit_summary(model: pl.LightningModule, card: str | Path) -> str:
    """``test {metric: value}; best {…}; model card PATH``: the line printed after a fit."""
    test = {k: round(v["value"], 4) for k, v in model.test_results.items() if k != "n"}
    return f"test {test}; best {model.best}; model card {card}"


def launch(
    module: type[pl.LightningModule],
    data: type[pl.LightningDataModule],
    args: list[str] | None,
    prog: str,
    default_root: str,
    callbacks: list[Callback] | None = None,
    cli_class: type[MedfmCLI] = MedfmCLI,
    description: str = "",
) -> MedfmCLI:
    """Run LightningCLI (``cli_class``) for ``module`` + ``data`` on ``args`` with medfm's defaults."""
    # sys.argv stays as it is ("medfm pretrain ..."): DDP relaunches the same command line in each process.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    run_class = type(f"{cli_class.__name__}Run", (cli_class,), {"default_root": default_root})
    return run_class(
        module,
        data,
        args=args,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "use_distributed_sampler": False,  # medfm's EpochSampler shards each epoch over the ranks itself
            "callbacks": [
                ModelCheckpoint(save_last="link", every_n_epochs=1),  # last.ckpt links the one kept file
                LearningRateMonitor(logging_interval="step"),
                *(callbacks or []),
            ],
        },
        parser_kwargs={"prog": prog, "description": description or None},
    )
