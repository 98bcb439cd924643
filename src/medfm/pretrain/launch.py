"""``medfm pretrain``: LightningCLI over :class:`PretrainModule` and :class:`PretrainData`, and ``export``.

``medfm pretrain fit --config run.yaml [--trainer.devices 2 …]`` trains; ``--print_config`` shows the resolved
config, which is also saved beside the checkpoints; ``--ckpt_path last`` resumes the newest ``last.ckpt`` under
the run's ``default_root_dir``. ``medfm pretrain export CKPT --name NAME`` registers the trained trunk.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import Accelerator, CPUAccelerator
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn

from medfm.pretrain.data import PretrainData
from medfm.pretrain.losses import world
from medfm.pretrain.module import PretrainModule

DEFAULT_ROOT = "outputs/pretrain"


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


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's part is the sum of all ranks' gradients of the result."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of the global batch, over any process group backend.

    torch's ``SyncBatchNorm`` runs on GPUs only (DDP refuses it on the CPU); this one sums per-channel moments
    with ``all_reduce`` (gloo included), so a CPU DDP run normalises as one process on the whole batch. Outside
    training or without a multi-process group it is an ordinary batch norm; its state dict is batch norm's.
    """

    original: type[nn.modules.batchnorm._BatchNorm] = nn.BatchNorm3d

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise with the global batch's moments in training on several ranks, else as batch norm."""
        if not self.training or world()[1] == 1:
            return super().forward(input)
        self._check_input_dim(input)
        shape = (1, -1) + (1,) * (input.dim() - 2)
        dims = [0, *range(2, input.dim())]
        x = input.float()
        count = torch.tensor([float(x.numel() // x.shape[1])], device=x.device)
        dist.all_reduce(count)
        mean = _AllReduceSum.apply(x.sum(dims)) / count
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / count  # two passes: no E[x²] - E[x]² loss
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                n = float(count)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(var.detach() * n / max(n - 1.0, 1.0), alpha=momentum)
        return out.to(input.dtype)


def _swap_batch_norms(module: nn.Module, to_global: bool) -> nn.Module:
    """Replace batch norms by :class:`GlobalBatchNorm` (or back), sharing their parameters and buffers."""
    out = module
    if (
        to_global
        and isinstance(module, nn.modules.batchnorm._BatchNorm)
        and not isinstance(module, (nn.SyncBatchNorm, GlobalBatchNorm))
    ):
        out = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        out.original = type(module)
    elif not to_global and isinstance(module, GlobalBatchNorm):
        out = module.original(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
    if out is not module:
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _swap_batch_norms(child, to_global))
    return out


class GlobalBatchNormSync(TorchSyncBatchNorm):
    """``sync_batchnorm`` for CPU (gloo) runs, where torch's SyncBatchNorm is refused: :class:`GlobalBatchNorm`."""

    def apply(self, model: nn.Module) -> nn.Module:
        """Every batch norm of ``model`` becomes a :class:`GlobalBatchNorm`."""
        return _swap_batch_norms(model, to_global=True)

    def revert(self, model: nn.Module) -> nn.Module:
        """Every :class:`GlobalBatchNorm` becomes its original batch norm again."""
        return _swap_batch_norms(model, to_global=False)


def runs_on_cpu(accelerator: object) -> bool:
    """Whether a Trainer's ``accelerator`` setting trains on the CPU."""
    if isinstance(accelerator, Accelerator):
        return isinstance(accelerator, CPUAccelerator)
    name = str(accelerator or "auto").lower()
    return name == "cpu" or (name == "auto" and not torch.cuda.is_available())


class MedfmCLI(LightningCLI):
    """LightningCLI with medfm's defaults: CSV (+TensorBoard) logging, last checkpoints, resumable runs."""

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        root = config.get("default_root_dir") or DEFAULT_ROOT
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


def run_cli(args: list[str] | None = None) -> MedfmCLI:
    """Run ``medfm pretrain`` with LightningCLI on ``args`` (e.g. ``["fit", "--config", "run.yaml"]``)."""
    # sys.argv stays as it is ("medfm pretrain ..."): DDP relaunches the same command line in each process.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    return MedfmCLI(
        PretrainModule,
        PretrainData,
        args=args,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "use_distributed_sampler": False,  # medfm's EpochSampler shards each epoch over the ranks itself
            "callbacks": [
                ModelCheckpoint(save_last=True, every_n_epochs=1),
                LearningRateMonitor(logging_interval="step"),
            ],
        },
        parser_kwargs={"prog": "medfm pretrain"},
    )
