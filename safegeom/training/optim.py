"""The optimizer of every training method: AdamW with the run's schedule (its step over the ranks is
:func:`safegeom.training.loop.optimizer_step`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from safegeom.training.config import RunConfig

__all__ = ["lr_lambda", "make_optimizer", "restore_schedule"]


def lr_lambda(config: RunConfig) -> Callable[[int], float]:
    """The schedule as a factor of the peak lr per step: linear warm-up, then constant or cosine."""

    settings = config.train

    def factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        if settings.schedule == "constant":
            return 1.0
        t = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return factor


def make_optimizer(
    params: list[nn.Parameter], config: RunConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``params`` (weight decay on matrices only) and its learning-rate schedule."""
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.train.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))


def restore_schedule(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    config: RunConfig,
    step: int,
) -> None:
    """Set every param group's lr to ``config``'s schedule at ``step``, after a resume restored
    ``optimizer`` and ``scheduler`` from a checkpoint at ``step``.

    The restored groups hold the lr the saved run computed for its next step. A resumed run with
    the saved settings gets the same value back (the same product ``base_lr · factor``); a run
    extended to more ``steps`` gets its new schedule's, where the saved one would give the finished
    schedule's last lr (0 at the end of a cosine).
    """
    factor = lr_lambda(config)(step)
    for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base_lr * factor
