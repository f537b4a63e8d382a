"""Generated refusals of a sweep cell over several processes: the (direction, batch) units dealt.

The sharded twin of :func:`safegeom.sweeps.generated.generated_refusals` (installed by
:func:`safegeom.parallel.dispatch.sharding`). Each rank tokenizes its share of the prompts
(:func:`~safegeom.parallel.encoding.encode_dealt`), every rank plans the batches one process
generates (the smallest automatic size over the ranks, longest first), the (direction, batch)
units are dealt round robin (:func:`~safegeom.parallel.ranks.shard`), each rank generates its
units by itself (:func:`~safegeom.parallel.ranks.alone`: no nested sharding), and every rank gets
every judgement back in order: equal to one process's, bit for bit, since each batch is the very
batch one process runs under the same intervention.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from safegeom.models.chat import encode_set
from safegeom.models.loading import LoadedModel
from safegeom.parallel.encoding import encode_dealt
from safegeom.parallel.ranks import all_or_none, alone, gather, shard
from safegeom.parallel.row_scores import batch_plan
from safegeom.prompts import PromptSet
from safegeom.sweeps.generated import MakeIntervention, judged_batch

__all__ = ["generated_refusals_dealt"]


def generated_refusals_dealt(
    lm: LoadedModel,
    prompts: PromptSet,
    interventions: Sequence[MakeIntervention | None],
    *,
    max_new_tokens: int,
) -> np.ndarray:
    """:func:`~safegeom.sweeps.generated.generated_refusals` over every process of the job.

    Returns:
        float array ``[len(interventions), len(prompts)]``, prompts in input order, on every rank.
    """
    encoded = encode_set(
        lm.tokenizer,
        prompts,  # a PromptSet's texts, or an attack set's own ids
        chat_template=lm.chat_template,
        max_positions=lm.max_positions,
        encode=encode_dealt,
    )  # each rank tokenizes its share, once
    plan = batch_plan(lm, [len(e) + max_new_tokens for e in encoded.encoded], None)
    units = [(d, b) for d in range(len(interventions)) for b in range(len(plan))]
    mine = shard(len(units))

    def run() -> list[list[float]]:
        out = []
        for u in mine:
            d, b = units[u]
            with alone():  # one batch of this rank's own: nothing shards inside
                out.append(
                    judged_batch(
                        lm, encoded, plan[b], interventions[d], max_new_tokens=max_new_tokens
                    )
                )
        return out

    judged = gather(all_or_none(run), mine, len(units), to="all")
    table = np.zeros((len(interventions), len(encoded)))
    for (d, b), values in zip(units, judged, strict=True):
        table[d, plan[b]] = values
    return table
