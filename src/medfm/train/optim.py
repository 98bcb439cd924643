"""Optimisation for self-supervised pre-training: LARS, parameter groups, learning-rate scaling and schedule.

SimCLR's recipe (which FMCIB pre-trains with): LARS with momentum 0.9, learning rate ``0.3 * batch / 256``,
weight decay 1e-6 on the weights only (biases and normalisation parameters get neither decay nor trust-ratio
adaptation), and a cosine decay of the rate after a linear warm-up, stepped once per optimiser step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch

from medfm.errors import ConfigError

OPTIMIZERS = ("lars", "sgd", "adamw", "adam")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as in SimCLR.

    For a parameter ``p`` with gradient ``g`` in a group that is not ``lars_exclude``::

        g = g + weight_decay * p
        trust = trust_coefficient * ||p|| / (||g|| + eps)   (1 when ||p|| or ||g|| is 0)
        g = trust * g

    and then, for every parameter, ``v = momentum * v + g`` and ``p = p - lr * v``. A group with
    ``"lars_exclude": True`` (biases, normalisation weights) skips the decay and the trust ratio.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ) -> None:
        if lr < 0.0:
            raise ConfigError(f"learning rate must be >= 0, got {lr}")
        if momentum < 0.0:
            raise ConfigError(f"momentum must be >= 0, got {momentum}")
        if weight_decay < 0.0:
            raise ConfigError(f"weight decay must be >= 0, got {weight_decay}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Apply one update to every parameter that has a gradient; return the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"]
            momentum = group["momentum"]
            weight_decay = group["weight_decay"]
            exclude = group["lars_exclude"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                g = p.grad
                if not exclude:
                    if weight_decay != 0.0:
                        g = g.add(p, alpha=weight_decay)
                    p_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    trust = torch.where(
                        (p_norm > 0) & (g_norm > 0),
                        group["trust_coefficient"] * p_norm / (g_norm + group["eps"]),
                        torch.ones_like(p_norm),
                    )
                    g = g.mul(trust)
                if momentum != 0.0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = g.detach().clone()
                    else:
                        buf.mul_(momentum).add_(g)
                    g = buf
                p.add_(g, alpha=-lr)
        return loss


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed, adapted) and biases + normalisation parameters (lars_exclude, no decay).

    A parameter with at most one dimension (a bias, a BatchNorm/LayerNorm/GroupNorm scale) is excluded; every
    other trainable parameter is a weight. Frozen parameters (``requires_grad=False``) are left out.
    """
    weights: list[torch.nn.Parameter] = []
    excluded: list[torch.nn.Parameter] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (excluded if param.ndim <= 1 else weights).append(param)
    return [
        {"params": weights, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
    ]


def scaled_lr(base_lr: float, batch_size: int, rule: str = "linear") -> float:
    """Learning rate for a batch size: ``linear`` is ``base * B / 256``, ``sqrt`` is ``base * sqrt(B)`` (SimCLR)."""
    if batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    if rule == "linear":
        return base_lr * batch_size / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size)
    raise ConfigError(f"unknown learning-rate scaling rule {rule!r}; expected one of 'linear', 'sqrt'")


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, final_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to ``final_ratio`` of the base rate, to be stepped once per optimiser step.

    The multiplier at step ``s`` is ``(s + 1) / warmup_steps`` while ``s < warmup_steps``, then
    ``final_ratio + (1 - final_ratio) * (1 + cos(pi * (s - warmup_steps) / (total_steps - warmup_steps))) / 2``
    until ``total_steps``, and ``final_ratio`` from there on.
    """
    if total_steps <= 0:
        raise ConfigError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ConfigError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if step >= total_steps:
            return final_ratio
        decay_steps = total_steps - warmup_steps
        progress = (step - warmup_steps) / decay_steps
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def build_optimizer(
    name: str, params: list[dict], lr: float, weight_decay: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """Optimizer by name (``lars``, ``sgd``, ``adamw``, ``adam``); groups' own ``weight_decay`` override the default."""
    key = name.lower()
    if key == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if key == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if key == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if key == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


def trainer_schedule(
    trainer: pl.Trainer, optimizer: torch.optim.Optimizer, warmup_epochs: float, final_ratio: float = 0.0
) -> dict:
    """Warm-up + cosine over the run a Trainer will make, stepped every optimiser step (Lightning's scheduler dict).

    Warm-up epochs are counted in steps from the training loader's length: ``total / max_epochs`` is wrong when
    ``max_steps`` ends the run (``max_epochs`` is then -1, or larger than the run takes).
    """
    total = max(1, int(trainer.estimated_stepping_batches))
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    if math.isfinite(batches) and batches > 0:
        per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
    else:
        per_epoch = total / max(1, trainer.max_epochs or 1)
    warmup = min(total, int(round(warmup_epochs * per_epoch)))
    return {"scheduler": warmup_cosine(optimizer, total, warmup, final_ratio), "interval": "step"}


def grouped_optimizer(trainer: pl.Trainer, groups: list[dict], hp: Any, default_lr: float) -> dict:
    """Lightning's optimiser dict for parameter groups with their own learning rates (empty groups dropped).

    ``hp`` carries ``optimizer``, ``weight_decay``, ``momentum``, ``warmup_epochs`` and ``final_lr_ratio``;
    the schedule is warm-up + cosine over the Trainer's run, stepped every optimiser step.
    """
    groups = [{**g, "weight_decay": hp.weight_decay} for g in groups if g["params"]]
    optimizer = build_optimizer(hp.optimizer, groups, default_lr, hp.weight_decay, hp.momentum)
    schedule = trainer_schedule(trainer, optimizer, hp.warmup_epochs, hp.final_lr_ratio)
    return {"optimizer": optimizer, "lr_scheduler": schedule}
