"""The step of the methods regularised towards the reference (kl, adaptive; docs/methods.md §7).

The reference is the frozen model itself: the same LoRA model with its adapters disabled and
dropout off, run without gradients on the step's rows. Per example, the answer tokens'
cross-entropy and KL(P_ref ‖ P_θ) are mixed by
:func:`~safegeom.training.regularised.regularised_loss`: a constant weight (no risks), or the
adaptive weights from each example's risk.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from safegeom.training.data import IGNORE_INDEX
from safegeom.training.methods.base import StepInputs, Terms
from safegeom.training.regularised import per_example_terms, regularised_loss

__all__ = ["reference_logits", "regularised_step"]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Within the block every module is in eval mode (no dropout); each one's mode is restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def reference_logits(inputs: StepInputs) -> Tensor:
    """The frozen model's logits on the step's rows: adapters off, no dropout, no gradients."""
    trainable, batch = inputs.trainable, inputs.batch
    reference = trainable.module.disable_adapter()  # type: ignore[operator]
    with torch.no_grad(), reference, _eval_mode(trainable.model):
        out = trainable.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        )
    return out.logits


def regularised_step(
    inputs: StepInputs,
    *,
    kl_weight: float = 1.0,
    risks: Tensor | None = None,
    risk_unit: Literal["example", "batch"] = "example",
    kl_rows: Tensor | None = None,
) -> tuple[Tensor, Terms]:
    """The loss of this rank's share of a step and its terms, regularised towards the reference.

    ``risks`` (one per training example, in [1, 5]) gives the adaptive mix; ``None`` the
    constant weight ``kl_weight``. ``kl_rows`` (one bool per training example, constant weight
    only) marks the examples whose KL counts (``None``: all). Means are per answered example of
    the whole batch (see :func:`~safegeom.training.regularised.regularised_loss`).

    Returns:
        ``(loss, terms)`` with terms ``task``, ``kl`` (and ``risk``, ``sft_w``, ``kl_w`` with
        risks).
    """
    ref = reference_logits(inputs)
    labels = inputs.batch.labels
    ce, kl = per_example_terms(inputs.logits, ref, labels)
    assert kl is not None
    answered = (labels[:, 1:] != IGNORE_INDEX).any(-1)
    risk = None if risks is None else risks[list(inputs.mine)]
    every = [inputs.answer_tokens[i] > 0 for i in inputs.indices]
    batch_risk = None
    if risks is not None and risk_unit == "batch" and inputs.world > 1:
        w = torch.tensor(every, dtype=torch.float32)
        batch_risk = (risks[list(inputs.indices)].float() * w).sum() / w.sum().clamp(min=1)
    return regularised_loss(
        ce,
        kl,
        answered,
        risk=risk,
        kl_weight=kl_weight,
        risk_unit=risk_unit,
        total=sum(every),
        batch_risk=batch_risk,
        world=inputs.world,
        kl_rows=None if kl_rows is None else kl_rows[list(inputs.mine)],
    )
