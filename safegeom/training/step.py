"""What one optimizer step computes: the forward of the trained model, then the method's loss.

:class:`StepLoss` turns the indices of a step's examples into ``(loss, terms)``: it collates this
rank's rows, runs the trained model on them and hands the logits to the method's state
(:meth:`~safegeom.training.methods.base.Prepared.loss`), which adds what the method needs (a
reference forward, a penalty forward over calibration prompts) and names the terms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from safegeom.training.data import IGNORE_INDEX, Example, collate_right
from safegeom.training.methods.base import Prepared, StepInputs, Terms
from safegeom.training.trainable import Trainable

__all__ = ["StepLoss", "local_part"]


def local_part(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous slice of a step's global batch ``indices`` cut over ``world``
    ranks (``len / world`` items; all of it for ``world`` 1).

    Example:
        >>> local_part([10, 11, 12, 13], 1, 2)
        [12, 13]
    """
    size = len(indices) // world
    return list(indices[rank * size : (rank + 1) * size])


@dataclass
class StepLoss:
    """The loss of a step from the indices of its examples (see the module docstring)."""

    trainable: Trainable
    """The model being trained."""
    examples: list[Example]
    """The encoded training examples."""
    pad_id: int
    """The padding token id."""
    state: Prepared
    """The method's state: its loss of a batch."""

    def __post_init__(self) -> None:
        """Count every example's answer tokens (the labels after the causal shift)."""
        self._targets = [sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in self.examples]

    def __call__(
        self, indices: Sequence[int], step: int, *, part: tuple[int, int] = (0, 1)
    ) -> tuple[Tensor, Terms]:
        """``(loss, terms)`` of the step ``step`` on examples ``indices`` (terms detached).

        ``indices`` is the step's whole (global) batch; ``part`` ``(rank, world)`` makes this call
        compute one rank's share: the forward runs on its slice
        (:func:`local_part`) and every mean is still taken over the whole
        batch, so the shares of the ``world`` ranks add up to the loss and terms of one process.
        """
        rank, world = part
        lm = self.trainable.lm
        mine = local_part(indices, rank, world)
        rows = [self.examples[i] for i in mine]
        batch = collate_right(rows, self.pad_id).to(lm.device)
        logits = self.trainable.logits(
            batch.input_ids, batch.attention_mask, [e.n_prompt for e in rows]
        )
        inputs = StepInputs(
            trainable=self.trainable,
            batch=batch,
            logits=logits,
            indices=indices,
            mine=mine,
            step=step,
            world=world,
            answer_tokens=self._targets,
            pad_id=self.pad_id,
            rank=rank,
        )
        return self.state.loss(inputs)
