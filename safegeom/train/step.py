"""What one optimizer step computes, for every method: the loss and its named terms.

:class:`StepLoss` turns the indices of a step's examples into ``(loss, terms)``:

- ``sft``, ``lora``: the LM loss on answer tokens (``terms["task"]``);
- ``refusalguard``: the same plus ``λ_geom · penalty`` (``terms["geom"]``) every
  ``penalty_every`` steps, from a second forward of the decoder alone (no LM head) over the
  step's calibration prompts, padded among themselves only;
- ``kl``, ``adaptive``: per-example cross-entropy and KL(P_ref ‖ P_θ) against the reference (the
  adapters disabled, dropout off, no gradients), mixed by
  :func:`~safegeom.train.regularised.regularised_loss` (``terms`` ``task``, ``kl``, and for
  adaptive ``risk``, ``sft_w``, ``kl_w``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from safegeom.train.data import IGNORE_INDEX, Example, collate_right
from safegeom.train.guard import GeometryPenalty
from safegeom.train.parallel import local_part
from safegeom.train.regularised import per_example_terms, regularised_loss
from safegeom.train.wrap import Trainable

__all__ = ["StepLoss"]


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


@dataclass
class StepLoss:
    """The loss of a step from the indices of its examples (see the module docstring)."""

    trainable: Trainable
    examples: list[Example]
    pad_id: int
    penalty: GeometryPenalty | None = None
    lambda_geom: float = 0.0
    calib_batch: int = 0
    penalty_every: int = 1
    seed: int = 0
    reference: bool = False
    """Compute the reference logits (``kl``, ``adaptive``)."""
    kl_weight: float = 1.0
    risks: Tensor | None = None
    """Per-example risks in [1, 5] (``adaptive``); ``None`` for a constant weight."""
    risk_unit: str = "example"

    def __post_init__(self) -> None:
        """Count every example's answer tokens (the labels after the causal shift)."""
        self._targets = [sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in self.examples]

    def _calibration(self, step: int) -> list[int]:
        if self.penalty is None or step % self.penalty_every:
            return []
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return self.penalty.sample(self.calib_batch, generator)

    def __call__(
        self, indices: Sequence[int], step: int, *, part: tuple[int, int] = (0, 1)
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, terms)`` of the step ``step`` on examples ``indices`` (terms detached).

        ``indices`` is the step's whole (global) batch; ``part`` ``(rank, world)`` makes this call
        compute one rank's share: the forward runs on its slice
        (:func:`~safegeom.train.parallel.local_part`) and every mean is still taken over the whole
        batch (answer tokens, answered examples), the calibration penalty counted ``1 / world``
        on every rank, so the shares of the ``world`` ranks add up to the loss and terms of one
        process (in nats per answer token, or per example for kl and adaptive).
        """
        rank, world = part
        trainable, lm = self.trainable, self.trainable.lm
        mine = local_part(indices, rank, world)
        rows = [self.examples[i] for i in mine]
        batch = collate_right(rows, self.pad_id).to(lm.device)
        per_example = self.reference
        edit = trainable.edit
        with edit.prompt_lengths([e.n_prompt for e in rows]) if edit else nullcontext():
            out = trainable.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            )
        calib = self._calibration(step)
        geom = self.penalty.value_of(calib, self.pad_id) if calib and self.penalty else None
        if per_example:
            # The reference is the frozen model itself: adapters off and no dropout.
            reference = trainable.module.disable_adapter()  # type: ignore[operator]
            with torch.no_grad(), reference, _eval_mode(trainable.model):
                ref = trainable.model(input_ids=batch.input_ids,
                                      attention_mask=batch.attention_mask, use_cache=False).logits  # fmt: skip
            labels = batch.labels
            ce, kl = per_example_terms(out.logits, ref, labels)
            assert kl is not None
            answered = (labels[:, 1:] != IGNORE_INDEX).any(-1)
            risk = None if self.risks is None else self.risks[mine]
            every = [self._targets[i] > 0 for i in indices]
            batch_risk = None
            if self.risks is not None and self.risk_unit == "batch" and world > 1:
                w = torch.tensor(every, dtype=torch.float32)
                batch_risk = (self.risks[list(indices)].float() * w).sum() / w.sum().clamp(min=1)
            loss, terms = regularised_loss(ce, kl, answered, risk=risk, kl_weight=self.kl_weight,
                                           risk_unit=self.risk_unit,  # type: ignore[arg-type]
                                           total=sum(every), batch_risk=batch_risk,
                                           world=world)  # fmt: skip
        else:
            loss = _token_loss(out.logits, batch.labels, sum(self._targets[i] for i in indices))
            terms = {"task": loss.detach()}
        if geom is not None:
            loss = loss + self.lambda_geom * geom / world
            terms["geom"] = geom.detach() / world
        return loss, terms


def _token_loss(logits: Tensor, labels: Tensor, total: int) -> Tensor:
    """The answer tokens' cross-entropy of ``logits`` summed, over ``total`` (the batch's answer
    tokens): the mean per answer token, in nats, when ``labels`` are the whole batch's."""
    target = labels[:, 1:].to(logits.device)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )  # fmt: skip
    return nll / max(total, 1)
