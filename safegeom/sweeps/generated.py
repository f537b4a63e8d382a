"""Generated refusals of a sweep cell: every direction × batch of prompts, dealt over the ranks.

A cell with ``generate=True`` generates greedy completions of its prompts once per direction (the
carrier and every random control) and judges them with the substring judge. The work units are
(direction, batch) pairs, each batch one of the batches one process generates (the automatic
size of :func:`~safegeom.generation.generate`, the smallest over the ranks, longest first).
Under a launcher the units are dealt round robin (:func:`~safegeom.distributed.shard`), each
rank generates its units by itself (:func:`~safegeom.distributed.alone`: no nested sharding),
and every rank gets every judgement back in order: equal to one process's, bit for bit, since
each batch is the very batch one process runs under the same intervention.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from safegeom.carriers.dealt import batch_plan
from safegeom.distributed import all_or_none, alone, gather, shard
from safegeom.generation import Intervention, generate
from safegeom.judges import SubstringJudge
from safegeom.models.chat import encode_set
from safegeom.models.loading import LoadedModel
from safegeom.prompts import PromptSet

__all__ = ["generated_refusals"]

MakeIntervention = Callable[[], Intervention]
"""A fresh intervention for one generation call (``None`` in a list: no intervention)."""


def generated_refusals(
    lm: LoadedModel,
    prompts: PromptSet,
    interventions: Sequence[MakeIntervention | None],
    *,
    max_new_tokens: int,
) -> np.ndarray:
    """Substring-judged refusals (1.0 / 0.0) of greedy completions, per intervention and prompt.

    ``interventions[d]()`` makes the intervention of direction ``d`` (called once per batch, so
    a one-use context manager is fine); ``None`` generates without intervention.

    Returns:
        float array ``[len(interventions), len(prompts)]``, prompts in input order, on every rank.
    """
    texts = list(prompts.prompts)
    encoded = encode_set(
        lm.tokenizer,
        texts,
        chat_template=lm.chat_template,
        max_positions=lm.max_positions,
        dealt=True,
    )  # each rank tokenizes its share, once
    plan = batch_plan(lm, [len(e) + max_new_tokens for e in encoded.encoded], None)
    units = [(d, b) for d in range(len(interventions)) for b in range(len(plan))]
    mine = shard(len(units))
    judge = SubstringJudge()

    def run() -> list[list[float]]:
        out = []
        for u in mine:
            d, b = units[u]
            batch = [texts[i] for i in plan[b]]
            make = interventions[d]
            with alone():  # one batch of this rank's own: nothing shards inside
                completions = generate(
                    lm,
                    encoded.select(plan[b]),
                    max_new_tokens=max_new_tokens,
                    batch_size=len(batch),
                    intervention=None if make is None else make(),
                    progress=False,
                )
            out.append([float(j) for j in judge(batch, completions)])
        return out

    judged = gather(all_or_none(run), mine, len(units), to="all")
    table = np.zeros((len(interventions), len(texts)))
    for (d, b), values in zip(units, judged, strict=True):
        table[d, plan[b]] = values
    return table
