"""Distributed training pieces shared by pre-training and fine-tuning: rank/world, gathering with gradients,
and batch norm over the global batch on any backend (gloo included)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.accelerators import Accelerator, CPUAccelerator
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn
from torch.distributed.nn.functional import all_gather

from medfm.train.sampler import world


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor over all ranks along dim 0, gradients flowing back to each rank's part."""
    _, size = world()
    if size == 1:
        return tensor
    if tensor.requires_grad:
        return torch.cat(all_gather(tensor), dim=0)
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


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
