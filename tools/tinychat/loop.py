"""The optimisation loop of the ``tiny-chat`` build: one :class:`Phase` is one fresh AdamW run.

``tiny-chat`` trains in two phases (:meth:`~tools.tinychat.build.TinyChatConfig.phases`):
a *base* phase from scratch on the prompts as they are, then a *content* phase that fine-tunes
the aligned base on head/tail-recombined prompts. Each phase has its own warm-up and cosine
schedule and its own corpus stream (``first_epoch``), so the content phase draws fresh responses,
framings and swaps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Int
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM

__all__ = ["CONTENT_FIRST_EPOCH", "Batch", "Phase", "lr_at", "response_loss", "run_phase"]

CONTENT_FIRST_EPOCH = 1_000
"""Corpus epoch index where the content phase starts, so its responses, framings, swaps and batch
order are drawn fresh rather than repeating the base phase's."""

Batch = tuple[
    Int[torch.Tensor, "batch seq"], Int[torch.Tensor, "batch seq"], Int[torch.Tensor, "batch seq"]
]
"""``(input_ids, attention_mask, labels)``; labels are ``-100`` outside the response."""


@dataclass(frozen=True)
class Phase:
    """One training phase: a fresh AdamW run over its own corpus stream.

    Attributes:
        name: ``"base"`` or ``"content"`` (shown on the progress bar).
        steps: Optimiser steps.
        lr: Peak learning rate (linear warm-up, then cosine decay to ``lr * min_lr_ratio``).
        warmup_steps: Linear warm-up steps.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        weight_decay: AdamW weight decay on matrices (norms and biases get none).
        grad_clip: Global gradient-norm clip.
        p_recombine: Head/tail recombination probability of the phase's corpus.
        p_rewrite: Surface-form rewriting probability of the phase's corpus
            (:mod:`~tools.tinychat.rewrite`).
        refuse: Whether the phase's harmful prompts get refusals (``False``: a compliant base).
        first_epoch: Corpus epoch index the phase starts from.
    """

    name: str
    steps: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    grad_clip: float
    p_recombine: float
    first_epoch: int
    p_rewrite: float = 0.0
    refuse: bool = True


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Learning rate at ``step``: linear warm-up to ``peak`` over ``warmup`` steps, then cosine
    decay to ``peak * min_ratio`` at step ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def response_loss(
    model: LlamaForCausalLM,
    input_ids: Int[torch.Tensor, "batch seq"],
    mask: Int[torch.Tensor, "batch seq"],
    labels: Int[torch.Tensor, "batch seq"],
) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) on response positions only; the LM head runs on those
    rows only."""
    hidden = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), target[keep])


def _optimizer(model: LlamaForCausalLM, weight_decay: float) -> torch.optim.AdamW:
    """A fresh AdamW with weight decay on matrices only (its lr is set at every step)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        betas=(0.9, 0.98),
        eps=1e-8,
    )


def run_phase(
    model: LlamaForCausalLM, batches: Iterator[Batch], phase: Phase, *, progress: bool = True
) -> None:
    """Train ``model`` in place for ``phase.steps`` steps of a fresh AdamW on ``batches``, with a
    tqdm bar showing the running (EMA) loss."""
    opt = _optimizer(model, phase.weight_decay)
    bar = tqdm(
        range(phase.steps), desc=f"tiny-chat {phase.name}", disable=not progress, mininterval=2.0
    )
    ema: float | None = None
    for step in bar:
        lr = lr_at(step, phase.lr, phase.warmup_steps, phase.steps, phase.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        input_ids, mask, labels = next(batches)
        loss = response_loss(model, input_ids, mask, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), phase.grad_clip)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
