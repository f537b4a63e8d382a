"""Score many candidate carriers at once with the refusal score (no generation).

Candidates are scored in *batched* forward passes: each prompt is repeated once per candidate and
every batch row gets its own candidate through the row-wise interventions
(:func:`~safegeom.interventions.ablate_rows`, :func:`~safegeom.interventions.add_rows`). Only
last-position logits are computed (``logits_to_keep=1``). Under a launcher the batches are dealt
over the processes (:mod:`safegeom.carriers.row_scores`): one process's scores on every rank.

Refusal score (docs/methods.md §1): ``p = Σ softmax(logits)[refusal tokens]`` in float64 and
``log(p + 1e-8) − log(1 − p + 1e-8)`` (nats of log-odds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jaxtyping import Float, Int
from torch import Tensor

from safegeom.carriers.row_scores import row_scores
from safegeom.evaluation import refusal_log_odds
from safegeom.generation import ForwardCounter
from safegeom.interventions import ablate_rows, add_rows
from safegeom.models.chat import EncodedPrompt
from safegeom.models.loading import LoadedModel

__all__ = [
    "CandidateScores",
    "ForwardCounter",
    "refusal_log_odds",
    "score_candidates",
]


@dataclass(frozen=True)
class CandidateScores:
    """Selection scores of ``C`` candidates (docs/methods.md §1), each a float64 tensor ``[C]``."""

    bypass: Float[Tensor, " C"]
    """Mean refusal score on harmful prompts with the candidate ablated everywhere."""
    induce: Float[Tensor, " C"]
    """Mean refusal score on harmless prompts with the candidate added at its layer."""
    kl: Float[Tensor, " C"]
    """Mean KL(base ‖ ablated) of next-token distributions on harmless prompts (nats)."""
    base_harmful: float
    """Mean refusal score on harmful prompts without intervention."""
    base_harmless: float
    """Mean refusal score on harmless prompts without intervention."""


def _repeat(encoded: Sequence[EncodedPrompt], n: int) -> list[EncodedPrompt]:
    return [e for _ in range(n) for e in encoded]


def score_candidates(
    lm: LoadedModel,
    directions: Float[Tensor, "C d"],
    layers: Sequence[int],
    harmful: Sequence[EncodedPrompt],
    harmless: Sequence[EncodedPrompt],
    tokens: Int[Tensor, " t"],
    *,
    batch_size: int = 64,
    counter: ForwardCounter | None = None,
    progress: bool = True,
) -> CandidateScores:
    """Bypass, induce and KL scores of every candidate, in batched forward passes.

    ``directions[c]`` is added unnormalised (coefficient +1) at the block input of ``layers[c]``
    for the induce score, and ablated (as a unit direction) at every block input and every
    attention and MLP output for the bypass and KL scores. Under a launcher every rank runs its
    share of the batches one process runs (:func:`~safegeom.carriers.row_scores.row_scores`) and
    every rank gets every score, equal to one process's bit for bit.

    Returns:
        :class:`CandidateScores` (refusal log-odds in nats; KL in nats).
    """
    n_cand = directions.shape[0]
    dirs = directions.float()
    layer_t = list(layers)
    n_h, n_s = len(harmful), len(harmless)

    def rows_of(n_prompts: int, rows: list[int]) -> list[int]:
        return [r // n_prompts for r in rows]

    def odds(lp: Tensor, rows: list[int]) -> Tensor:
        return refusal_log_odds(lp, tokens)

    common = {"batch_size": batch_size, "counter": counter}
    base_h = row_scores(lm, harmful, odds, **common)
    base_s = row_scores(lm, harmless, lambda lp, rows: lp, **common)  # [n_s, vocab]

    def kl(lp: Tensor, rows: list[int]) -> Tensor:
        base = base_s[[r % n_s for r in rows]]
        return (base.exp() * (base - lp)).sum(-1)

    bypass = row_scores(
        lm,
        _repeat(harmful, n_cand),
        odds,
        progress=progress,
        desc="bypass",
        batch_context=lambda rows: ablate_rows(lm, dirs[rows_of(n_h, rows)]),
        **common,
    )
    kls = row_scores(
        lm,
        _repeat(harmless, n_cand),
        kl,
        progress=progress,
        desc="kl",
        batch_context=lambda rows: ablate_rows(lm, dirs[rows_of(n_s, rows)]),
        **common,
    )
    induce = row_scores(
        lm,
        _repeat(harmless, n_cand),
        odds,
        progress=progress,
        desc="induce",
        batch_context=lambda rows: add_rows(
            lm, dirs[rows_of(n_s, rows)], [layer_t[c] for c in rows_of(n_s, rows)]
        ),
        **common,
    )
    return CandidateScores(
        bypass=bypass.view(n_cand, n_h).mean(-1),
        induce=induce.view(n_cand, n_s).mean(-1),
        kl=kls.view(n_cand, n_s).mean(-1),
        base_harmful=float(base_h.mean()),
        base_harmless=float(refusal_log_odds(base_s, tokens).mean()),
    )
