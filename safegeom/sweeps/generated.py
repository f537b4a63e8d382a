"""Generated refusals of a sweep cell: every direction × batch of prompts, judged.

A cell with ``generate=True`` generates greedy completions of its prompts once per direction (the
carrier and every random control) and judges them with the substring judge. The work units are
(direction, batch) pairs, each batch one of the batches one process generates (the automatic
size of :func:`~safegeom.generation.generate`, longest first), run by :func:`judged_batch`.

This module is single-process. Under a launcher the entry points install the sharded twin
(:mod:`safegeom.execution`): :func:`safegeom.parallel.sweeps.generated_refusals_dealt` deals the
units round robin over the ranks and gathers the judgements, equal to these bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from safegeom.carriers.row_scores import batch_plan
from safegeom.execution import twin
from safegeom.generation import Intervention, generate
from safegeom.judges import SubstringJudge
from safegeom.models.chat import EncodedSet, encode_set
from safegeom.models.loading import LoadedModel
from safegeom.prompts import PromptSet

__all__ = ["MakeIntervention", "generated_refusals", "judged_batch"]

MakeIntervention = Callable[[], Intervention]
"""A fresh intervention for one generation call (``None`` in a list: no intervention)."""


def judged_batch(
    lm: LoadedModel,
    encoded: EncodedSet,
    batch: Sequence[int],
    make: MakeIntervention | None,
    *,
    max_new_tokens: int,
) -> list[float]:
    """Substring-judged refusals (1.0 / 0.0) of one batch of prompts (indices into ``encoded``),
    generated as one batch under ``make()`` (no intervention when ``make`` is ``None``).

    Returns:
        One judgement per prompt of ``batch``, in its order.
    """
    texts = [encoded.prompts[i] for i in batch]
    completions = generate(
        lm,
        encoded.select(list(batch)),
        max_new_tokens=max_new_tokens,
        batch_size=len(texts),
        intervention=None if make is None else make(),
        progress=False,
    )
    return [float(j) for j in SubstringJudge()(texts, completions)]


def generated_refusals(
    lm: LoadedModel,
    prompts: PromptSet | EncodedSet,
    interventions: Sequence[MakeIntervention | None],
    *,
    max_new_tokens: int,
) -> np.ndarray:
    """Substring-judged refusals (1.0 / 0.0) of greedy completions, per intervention and prompt.

    ``interventions[d]()`` makes the intervention of direction ``d`` (called once per batch, so
    a one-use context manager is fine); ``None`` generates without intervention. ``prompts`` may
    be an attack set (its token ids as optimised, :func:`~safegeom.models.chat.encode_set`).

    Returns:
        float array ``[len(interventions), len(prompts)]``, prompts in input order.
    """
    if (shared := twin("generated_refusals")) is not None:
        return shared(lm, prompts, interventions, max_new_tokens=max_new_tokens)
    encoded = encode_set(
        lm.tokenizer,
        prompts,
        chat_template=lm.chat_template,
        max_positions=lm.max_positions,
    )
    plan = batch_plan(lm, [len(e) + max_new_tokens for e in encoded.encoded], None)
    table = np.zeros((len(interventions), len(encoded)))
    for d, make in enumerate(interventions):
        for batch in plan:
            table[d, batch] = judged_batch(lm, encoded, batch, make, max_new_tokens=max_new_tokens)
    return table
