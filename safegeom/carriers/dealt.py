"""Last-position scores of many rows, each rank running its share of one process's batches.

:func:`row_scores` is how carrier selection, the refusal filter, cone scoring and the causal
sweep run their batched forward passes. It plans the rows exactly as
:func:`~safegeom.generation.last_position_logprobs` does (the batch size one process picks, the
smallest over the ranks where it depends on free memory; longest first), deals the batches round
robin over the processes of a launcher (:func:`~safegeom.distributed.deal`), reduces each batch's
log-probabilities to what the caller keeps (a refusal score, a KL) on the rank that ran it, and
gathers the values to every rank in input order. Every batch is the very batch one process runs
(same rows, same order, same padding, same row-wise intervention), so the values equal one
process's bit for bit; only the reduced values travel between ranks, never ``[rows, vocab]``.

In one process (and inside :func:`~safegeom.distributed.alone`) it is the same loop with no
collective. Each step between collectives runs under :func:`~safegeom.distributed.all_or_none`: a
failure on one rank (NaN logits, a bad intervention) stops every rank with its message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from safegeom.batching import longest_first
from safegeom.distributed import all_or_none, collect, deal, gather, is_main, shard
from safegeom.generation import ForwardCounter, _batch_size, last_position_logprobs
from safegeom.models.chat import EncodedPrompt
from safegeom.models.loading import LoadedModel

__all__ = ["batch_plan", "row_scores"]

Reduce = Callable[[Tensor, list[int]], Tensor]
"""``reduce(logprobs [b, vocab] float64, row indices [b]) -> values [b, ...]``, row by row."""


def batch_plan(lm: LoadedModel, lengths: Sequence[int], batch_size: int | None) -> list[list[int]]:
    """The batches one process runs over rows of these token ``lengths`` (a collective).

    The batch size is ``batch_size`` when given, else the automatic size of
    :func:`~safegeom.generation.last_position_logprobs`, the smallest any rank chose.

    Returns:
        Row indices per batch, longest first (ties in input order), every rank the same.
    """
    own = _batch_size(lm.model, max(lengths, default=1), batch_size)
    size = min(collect(own, to="all") or [own])
    return list(longest_first(lengths, size))


def row_scores(
    lm: LoadedModel,
    rows: Sequence[EncodedPrompt],
    reduce: Reduce,
    *,
    batch_size: int | None,
    batch_context: Callable[[list[int]], AbstractContextManager[Any]] | None = None,
    counter: ForwardCounter | None = None,
    progress: bool = False,
    desc: str = "logprobs",
) -> Tensor:
    """``reduce`` of the next-token log-probabilities of every row, over every process.

    ``batch_context(indices)`` gets the batch's row indices into ``rows`` (as with
    :func:`~safegeom.generation.last_position_logprobs`); ``counter`` adds the passes and rows
    every rank spent (one process's counts).

    Returns:
        On every rank, the tensor ``[len(rows), ...]`` of ``reduce``'s values, in input order.

    Raises:
        NonFiniteError: the logits of a batch hold NaN or inf (on any rank).
    """
    plan = batch_plan(lm, [len(e.input_ids) for e in rows], batch_size)
    mine = shard(len(plan))
    spent = ForwardCounter()

    def run() -> list[Tensor]:
        out = []
        show = progress and is_main()
        bar = tqdm(total=sum(len(plan[b]) for b in mine), desc=desc, unit="row", disable=not show)
        for chunk in deal(plan):
            context = None
            if batch_context is not None:
                context = _within(batch_context, chunk)
            lp = last_position_logprobs(
                lm,
                [rows[i] for i in chunk],
                batch_size=len(chunk),
                batch_context=context,
                counter=spent,
                progress=False,
            )
            out.append(reduce(lp, chunk).cpu())
            bar.update(len(chunk))
        bar.close()
        return out

    parts = gather(all_or_none(run), mine, len(plan), to="all")
    if counter is not None:
        for passes, n_rows in collect((spent.passes, spent.rows), to="all") or []:
            counter.passes += passes
            counter.rows += n_rows
    if not parts:
        return torch.empty(0, dtype=torch.float64)
    values = torch.empty((len(rows), *parts[0].shape[1:]), dtype=parts[0].dtype)
    for chunk, part in zip(plan, parts, strict=True):
        values[chunk] = part
    return values


def _within(
    batch_context: Callable[[list[int]], AbstractContextManager[Any]], chunk: list[int]
) -> Callable[[list[int]], AbstractContextManager[Any]]:
    """``batch_context`` for one batch run on its own: its local row indices mapped back to the
    indices into the whole row list."""
    return lambda local: batch_context([chunk[j] for j in local])
