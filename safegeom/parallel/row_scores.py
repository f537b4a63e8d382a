"""Row scores over several processes: each rank runs its share of one process's batches.

The sharded twin of :func:`safegeom.carriers.row_scores.row_scores` (installed by
:func:`safegeom.parallel.dispatch.sharding`). It plans the rows as one process does (the batch
size one process picks, the smallest over the ranks where it depends on free memory; longest
first: :func:`batch_plan`), deals the batches round robin over the processes
(:func:`~safegeom.parallel.ranks.deal`), reduces each batch's log-probabilities to what the caller
keeps on the rank that ran it, and gathers the values to every rank in input order. Every batch
is the very batch one process runs (same rows, same order, same padding, same row-wise
intervention), so the values equal one process's bit for bit; only the reduced values travel
between ranks, never ``[rows, vocab]``.

Each step between collectives runs under :func:`~safegeom.parallel.ranks.all_or_none`: a failure
on one rank (NaN logits, a bad intervention) stops every rank with its message.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from tqdm.auto import tqdm

from safegeom.batching import longest_first
from safegeom.carriers.row_scores import (
    BatchContext,
    Reduce,
    in_row_order,
    rows_per_batch,
    score_batch,
)
from safegeom.generation import ForwardCounter
from safegeom.models.chat import EncodedPrompt
from safegeom.models.loading import LoadedModel
from safegeom.parallel.ranks import all_or_none, collect, deal, gather, is_main, shard

__all__ = ["batch_plan", "row_scores_dealt"]


def batch_plan(lm: LoadedModel, lengths: Sequence[int], batch_size: int | None) -> list[list[int]]:
    """The batches one process runs over rows of these token ``lengths`` (a collective).

    The batch size is ``batch_size`` when given, else the automatic size of
    :func:`~safegeom.carriers.row_scores.rows_per_batch`, the smallest any rank chose.

    Returns:
        Row indices per batch, longest first (ties in input order), every rank the same.
    """
    own = rows_per_batch(lm, lengths, batch_size)
    size = min(collect(own, to="all") or [own])
    return list(longest_first(lengths, size))


def row_scores_dealt(
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
    """:func:`~safegeom.carriers.row_scores.row_scores` over every process of the job.

    ``counter`` adds the passes and rows every rank spent (one process's counts).

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
            out.append(
                score_batch(lm, rows, chunk, reduce, batch_context=batch_context, counter=spent)
            )
            bar.update(len(chunk))
        bar.close()
        return out

    parts = gather(all_or_none(run), mine, len(plan), to="all")
    if counter is not None:
        for passes, n_rows in collect((spent.passes, spent.rows), to="all") or []:
            counter.passes += passes
            counter.rows += n_rows
    return in_row_order(plan, parts, len(rows))
