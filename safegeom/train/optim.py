"""The optimizer of every training method: AdamW with the run's schedule, and one step of it."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from safegeom.distributed import all_or_none
from safegeom.errors import TrainingDiverged
from safegeom.train.config import RunConfig
from safegeom.train.parallel import reseed_step, sum_gradients, sum_values
from safegeom.train.step import StepLoss
from safegeom.train.wrap import Trainable

__all__ = ["make_optimizer", "optimizer_step"]


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


def optimizer_step(
    acc: Accelerator,
    trainable: Trainable,
    step_loss: StepLoss,
    optimizer: Any,
    scheduler: Any,
    indices: list[int],
    step: int,
    *,
    grad_clip: float | None,
    lr: float,
    saved: int,
    seed: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step of any method: loss, backward, clip, AdamW and schedule steps.

    ``indices`` is the step's global batch; under ``acc.num_processes`` > 1 each rank computes
    its share on its slice (:mod:`safegeom.train.parallel`), the gradients are summed over the
    ranks (by FSDP's reduce-scatter when the weights are sharded), and every rank takes the
    same step (its dropout masks seeded from ``seed``, the step and the rank). A failure on one rank (a non-finite loss, an error in the forward) stops
    every rank with that rank's message. ``saved`` is the last saved checkpoint's step (named in
    the divergence message).

    Returns:
        The step's ``(loss, terms)`` over the global batch (nats per answer token or per
        example, as one process computes them), detached.

    Raises:
        TrainingDiverged: the loss is not finite.
        SafegeomError: another rank failed (the message names it and its error).
    """
    world, rank = acc.num_processes, acc.process_index

    def local() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        trainable.module.train()
        if world > 1:
            reseed_step(seed, step, rank)
        with acc.autocast():
            loss, terms = step_loss(indices, step, part=(rank, world))
        if not torch.isfinite(loss.detach()).all():
            raise TrainingDiverged(
                f"training diverged at step {step + 1}: the loss is {float(loss):.4g}; the run "
                f"keeps its checkpoints up to step {saved} and is not complete; "
                f"lower --lr (now {lr:g}) or raise --warmup-steps"
            )
        acc.backward(loss)
        return loss.detach(), terms

    loss, terms = all_or_none(local)
    params = trainable.parameters()
    if not trainable.sharded:  # FSDP has summed them in its reduce-scatter
        sum_gradients(params, world)
    loss, terms = sum_values(loss, terms, world)
    if grad_clip:
        acc.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, terms
