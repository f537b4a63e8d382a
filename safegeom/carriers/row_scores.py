"""Last-position scores of many rows, batch by batch, reduced to what the caller keeps.

:func:`row_scores` is how carrier selection, the refusal filter, cone scoring and the causal
sweep run their batched forward passes. It plans the rows exactly as
:func:`~safegeom.generation.last_position_logprobs` does (the automatic batch size, longest
first; :func:`batch_plan`), runs each batch (:func:`score_batch`), and reduces each batch's
log-probabilities to what the caller keeps (a refusal score, a KL), so only the reduced values are
held, never ``[rows, vocab]``; the values come back in input order (:func:`in_row_order`).

This module is single-process. Under a launcher the entry points install the sharded twin
(:mod:`safegeom.execution`): :func:`safegeom.parallel.row_scores.row_scores_dealt` deals the very
batches of :func:`batch_plan` over the ranks and gathers the values, equal to these bit for bit.

Example:
    >>> import torch
    >>> in_row_order([[2, 0], [1]], [torch.tensor([20.0, 0.0]), torch.tensor([10.0])], 3)
    tensor([ 0., 10., 20.])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from safegeom.batching import longest_first
from safegeom.execution import twin
from safegeom.generation import ForwardCounter, generation_batch_size, last_position_logprobs
from safegeom.models.chat import EncodedPrompt
from safegeom.models.loading import LoadedModel

__all__ = [
    "BatchContext",
    "Reduce",
    "batch_plan",
    "in_row_order",
    "row_scores",
    "rows_per_batch",
    "score_batch",
]

Reduce = Callable[[Tensor, list[int]], Tensor]
"""``reduce(logprobs [b, vocab] float64, row indices [b]) -> values [b, ...]``, row by row."""
BatchContext = Callable[[list[int]], AbstractContextManager[Any]]
"""``batch_context(row indices) -> context manager`` entered around one batch's forward."""


def rows_per_batch(lm: LoadedModel, lengths: Sequence[int], batch_size: int | None) -> int:
    """Rows per batch over rows of these token ``lengths``: ``batch_size`` when given, else the
    automatic size of :func:`~safegeom.generation.last_position_logprobs`."""
    return generation_batch_size(lm.model, max(lengths, default=1), batch_size)


def batch_plan(lm: LoadedModel, lengths: Sequence[int], batch_size: int | None) -> list[list[int]]:
    """The batches one process runs over rows of these token ``lengths``.

    Returns:
        Row indices per batch (:func:`rows_per_batch` rows at most), longest first (ties in
        input order).
    """
    return list(longest_first(lengths, rows_per_batch(lm, lengths, batch_size)))


def score_batch(
    lm: LoadedModel,
    rows: Sequence[EncodedPrompt],
    chunk: list[int],
    reduce: Reduce,
    *,
    batch_context: BatchContext | None,
    counter: ForwardCounter,
) -> Tensor:
    """``reduce`` of one batch, the rows ``chunk`` of ``rows``, run as one forward pass.

    ``batch_context`` gets indices into the whole of ``rows``; ``counter`` adds the pass.

    Returns:
        ``reduce``'s values of the batch, ``[len(chunk), ...]``, on the CPU.
    """
    context = None
    if batch_context is not None:
        context = _within(batch_context, chunk)
    lp = last_position_logprobs(
        lm,
        [rows[i] for i in chunk],
        batch_size=len(chunk),
        batch_context=context,
        counter=counter,
        progress=False,
    )
    return reduce(lp, chunk).cpu()


def in_row_order(plan: Sequence[Sequence[int]], parts: Sequence[Tensor], n: int) -> Tensor:
    """The values of every batch of ``plan`` (``parts``, one per batch) placed in row order.

    Returns:
        The tensor ``[n, ...]`` (float64 and empty when there are no batches).
    """
    if not parts:
        return torch.empty(0, dtype=torch.float64)
    values = torch.empty((n, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for chunk, part in zip(plan, parts, strict=True):
        values[list(chunk)] = part
    return values


def row_scores(
    lm: LoadedModel,
    rows: Sequence[EncodedPrompt],
    reduce: Reduce,
    *,
    batch_size: int | None,
    batch_context: BatchContext | None = None,
    counter: ForwardCounter | None = None,
    progress: bool = False,
    desc: str = "logprobs",
) -> Tensor:
    """``reduce`` of the next-token log-probabilities of every row.

    ``batch_context(indices)`` gets the batch's row indices into ``rows`` (as with
    :func:`~safegeom.generation.last_position_logprobs`); ``counter`` adds the passes and rows
    spent.

    Returns:
        The tensor ``[len(rows), ...]`` of ``reduce``'s values, in input order.

    Raises:
        NonFiniteError: the logits of a batch hold NaN or inf.
    """
    if (shared := twin("row_scores")) is not None:
        return shared(
            lm,
            rows,
            reduce,
            batch_size=batch_size,
            batch_context=batch_context,
            counter=counter,
            progress=progress,
            desc=desc,
        )
    plan = batch_plan(lm, [len(e.input_ids) for e in rows], batch_size)
    spent = ForwardCounter() if counter is None else counter
    parts = []
    with tqdm(total=len(rows), desc=desc, unit="row", disable=not progress) as bar:
        for chunk in plan:
            parts.append(
                score_batch(lm, rows, chunk, reduce, batch_context=batch_context, counter=spent)
            )
            bar.update(len(chunk))
    return in_row_order(plan, parts, len(rows))


def _within(batch_context: BatchContext, chunk: list[int]) -> BatchContext:
    """``batch_context`` for one batch run on its own: its local row indices mapped back to the
    indices into the whole row list."""
    return lambda local: batch_context([chunk[j] for j in local])
