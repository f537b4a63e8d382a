"""The optimizer of every training method: AdamW with the run's schedule (its step over the ranks is
:func:`safegeom.training.loop.optimizer_step`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from safegeom.training.config import RunConfig

__all__ = ["lr_lambda", "make_optimizer"]


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
