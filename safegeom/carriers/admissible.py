"""KL-constrained ("admissible") carriers (Lan et al. 2026, docs/methods.md §4).

A carrier is a direction or small subspace that causally modulates refusal while the next-token KL
on safe prompts stays small. For each candidate (e.g. the diff-in-means at every layer for refusal
at ``t_post[-1]`` or harmfulness at ``t_inst``, or a cone's leading-k subspaces) we measure, against
the unmodified model:

- ``kl``: mean KL(base ‖ ablated) of next-token distributions on harmless prompts (nats), with the
  carrier's span ablated at every block input and every attention and MLP output;
- ``bypass_effect``: mean refusal log-odds on harmful prompts, base minus ablated (nats; > 0 means
  ablation removes refusal);
- ``induce_effect``: mean refusal log-odds on harmless prompts with the carrier's addition vector
  added at its layer, minus base (nats; > 0 means addition induces refusal). The addition vector is
  ``alpha·unit`` when the carrier records an ``alpha`` score (cones, RDO), else its first vector
  unnormalised (a diff-in-means direction);
- ``effect = bypass_effect + induce_effect``.

A candidate is *admissible* when ``kl ≤ max_kl`` (0.1 by default) and its ranking effect exceeds
``min_effect``; the best admissible candidate is returned. The choice is maths on the scored table
(:func:`choose_admissible`, no model); :func:`admissible_carrier` scores and chooses.

Under a launcher every forward pass is shared out over the processes
(:func:`~safegeom.carriers.row_scores.row_scores`); every rank gets one process's table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from safegeom.carriers.candidate_scores import refusal_log_odds, score_candidates
from safegeom.carriers.carrier import Carrier
from safegeom.carriers.inputs import Prompts
from safegeom.carriers.refusal import dim_candidates
from safegeom.carriers.row_scores import row_scores
from safegeom.errors import ConfigError, SafegeomError
from safegeom.evaluation import refusal_token_ids
from safegeom.geometry import effective_rank
from safegeom.interventions import ablate, add
from safegeom.models.chat import encode_prompts
from safegeom.models.loading import LoadedModel
from safegeom.prompts import load_prompts

__all__ = [
    "admissibility_table",
    "admissible_carrier",
    "carrier_effective_rank",
    "choose_admissible",
    "dim_layer_candidates",
    "leading_subspaces",
]

RankBy = Literal["effect", "bypass_effect", "induce_effect"]


def carrier_effective_rank(carrier_or_vectors: Carrier | Tensor | np.ndarray) -> float:
    """Effective rank ``exp(H(σ/Σσ))`` of a carrier's vectors or of raw vectors ``[m, d]``, in
    [1, min(m, d)], dimensionless (our choice, docs/methods.md §4; see
    :func:`safegeom.geometry.effective_rank`).

    An orthonormal basis has effective rank exactly k, so measure concentration on *raw* vectors
    (e.g. diff-in-means across positions or categories; the cheap cone records that of its sources
    in ``scores["effective_rank"]``).
    """
    if isinstance(carrier_or_vectors, Carrier):
        return effective_rank(carrier_or_vectors.vectors)
    x = torch.as_tensor(carrier_or_vectors)
    return effective_rank(x[None] if x.dim() == 1 else x)


def dim_layer_candidates(
    lm: LoadedModel,
    harmful: Prompts,
    harmless: Prompts,
    *,
    kind: Literal["refusal", "harmfulness"] = "refusal",
    layers: str | Sequence[int] = "all",
    system: str | None = None,
    progress: bool = False,
) -> list[Carrier]:
    """Diff-in-means candidates per layer: refusal at ``t_post[-1]``, harmfulness at ``t_inst``.

    Returns:
        One :class:`Carrier` (``method="dim"``, raw float64 difference of means) per layer, except
        layers where the difference is exactly zero (e.g. layer 0 at a template token, where every
        prompt has the same embedding).
    """
    if kind not in ("refusal", "harmfulness"):
        raise ConfigError(f"unknown kind {kind!r}: use refusal or harmfulness")
    position = "last" if kind == "refusal" else "t_inst"
    cands = dim_candidates(
        lm, harmful, harmless, positions=position, layers=layers, system=system, progress=progress
    )
    label = "t_post[-1]" if kind == "refusal" else "t_inst"
    return [
        Carrier(
            vectors=cands.vectors[0, j],
            kind=kind,
            method="dim",
            layer=layer,
            position=label,
            provenance=cands.provenance.with_extra(system=system),
        )
        for j, layer in enumerate(cands.layers)
        if bool(cands.vectors[0, j].norm() > 0)
    ]


def leading_subspaces(cone: Carrier, ks: Sequence[int] | None = None) -> list[Carrier]:
    """The cone's leading-k subspaces (its first k rows) for each k in ``ks`` (default 1..K).

    Raises:
        SafegeomError: a k outside 1..K.
    """
    ks = list(ks) if ks is not None else list(range(1, cone.k + 1))
    bad = [k for k in ks if not 1 <= k <= cone.k]
    if bad:
        raise SafegeomError(f"leading subspaces need 1 ≤ k ≤ {cone.k}, got {bad}")
    return [replace(cone, vectors=cone.vectors[:k]) for k in ks]


def _addition_vector(c: Carrier) -> Float[Tensor, " d"]:
    return c.unit * float(c.scores["alpha"]) if "alpha" in c.scores else c.direction


def admissibility_table(
    lm: LoadedModel,
    candidates: Sequence[Carrier],
    harmful: Prompts,
    harmless: Prompts,
    *,
    tokens: Sequence[int] | None = None,
    batch_size: int = 64,
    system: str | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """KL and causal effects of every candidate (see the module docstring for the definitions).

    Directions at ``resid_pre`` are scored in batched forward passes
    (:func:`~safegeom.carriers.candidate_scores.score_candidates`); subspaces one by one.

    Returns:
        One row per candidate, in input order: ``candidate``, ``kind``, ``method``, ``layer``,
        ``position``, ``k``, ``kl``, ``bypass``, ``induce`` (refusal log-odds under intervention),
        ``bypass_effect``, ``induce_effect``, ``effect`` (nats).

    Raises:
        SafegeomError: no candidate, empty prompt sets, a hidden-size mismatch.
    """

    if not candidates:
        raise SafegeomError("no candidate carrier given")
    for c in candidates:
        c.check_model(lm.d_model, lm.weight_hash)
    ids = refusal_token_ids(lm, tokens)
    enc_h, enc_s = (
        encode_prompts(
            lm.tokenizer, load_prompts(p).prompts, system=system, chat_template=lm.chat_template
        )
        for p in (harmful, harmless)
    )

    def odds(lp: Tensor, rows: list[int]) -> Tensor:
        return refusal_log_odds(lp, ids)

    def kl_of(lp: Tensor, rows: list[int]) -> Tensor:
        return (base_s[rows].exp() * (base_s[rows] - lp)).sum(-1)

    base_h = row_scores(lm, enc_h, odds, batch_size=batch_size)  # log-odds [n_h]
    base_s = row_scores(lm, enc_s, lambda lp, rows: lp, batch_size=batch_size)  # [n_s, vocab]
    n = len(candidates)
    kl, bypass, induce = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    batched = [i for i, c in enumerate(candidates) if c.k == 1 and c.site == "resid_pre"]
    if batched:
        s = score_candidates(
            lm,
            torch.stack([_addition_vector(candidates[i]) for i in batched]),
            [candidates[i].layer for i in batched],
            enc_h,
            enc_s,
            ids,
            batch_size=batch_size,
            progress=progress,
        )
        kl[batched], bypass[batched], induce[batched] = s.kl, s.bypass, s.induce
    for i, c in enumerate(candidates):
        if i in batched:
            continue
        basis, vec = c.basis, _addition_vector(c)
        ablation = lambda _, b=basis: ablate(lm, b)  # noqa: E731
        addition = lambda _, c=c, v=vec: add(lm, v, layers=c.layer, site=c.site)  # noqa: E731
        abl_h = row_scores(lm, enc_h, odds, batch_size=batch_size, batch_context=ablation)
        abl_s = row_scores(lm, enc_s, kl_of, batch_size=batch_size, batch_context=ablation)
        add_s = row_scores(lm, enc_s, odds, batch_size=batch_size, batch_context=addition)
        kl[i] = float(abl_s.mean())
        bypass[i] = float(abl_h.mean())
        induce[i] = float(add_s.mean())
    base_harmful = float(base_h.mean())
    base_harmless = float(refusal_log_odds(base_s, ids).mean())
    table = pd.DataFrame(
        {
            "candidate": range(n),
            "kind": [c.kind for c in candidates],
            "method": [c.method for c in candidates],
            "layer": [c.layer for c in candidates],
            "position": [c.position for c in candidates],
            "k": [c.k for c in candidates],
            "kl": kl,
            "bypass": bypass,
            "induce": induce,
        }
    )
    table["bypass_effect"] = base_harmful - table["bypass"]
    table["induce_effect"] = table["induce"] - base_harmless
    table["effect"] = table["bypass_effect"] + table["induce_effect"]
    table.attrs.update(base_harmful=base_harmful, base_harmless=base_harmless)
    return table


def admissible_carrier(
    lm: LoadedModel,
    candidates: Sequence[Carrier],
    harmful: Prompts,
    harmless: Prompts,
    *,
    max_kl: float = 0.1,
    min_effect: float = 0.0,
    rank_by: RankBy = "effect",
    tokens: Sequence[int] | None = None,
    batch_size: int = 64,
    system: str | None = None,
    progress: bool = False,
) -> Carrier:
    """The best admissible carrier: ``kl ≤ max_kl`` and ``rank_by > min_effect``, highest
    ``rank_by`` (ties: the earlier candidate).

    Args:
        candidates: directions and/or subspaces (see :func:`dim_layer_candidates`,
            :func:`leading_subspaces`).
        harmful: prompts for the bypass effect; harmless: prompts for the KL and induce effect.
        max_kl: KL budget on harmless prompts (nats per next token).
        min_effect: the ranking effect must exceed this (nats of refusal log-odds).
        rank_by: ``effect`` (bypass + induce), ``bypass_effect`` or ``induce_effect``.

    Returns:
        The chosen candidate as a :class:`Carrier` with ``method="admissible"`` (its origin in
        ``provenance["source_method"]``) and ``scores`` ``kl``, ``bypass``, ``induce``,
        ``bypass_effect``, ``induce_effect``, ``effect``, ``base_harmful``, ``base_harmless``,
        ``max_kl``, ``n_candidates``, ``n_admissible``.

    Raises:
        SafegeomError: an unknown ``rank_by``, a negative ``max_kl``, or no admissible candidate
            (the message lists the lowest-KL ones).
    """
    _check_choice(max_kl, rank_by)
    table = admissibility_table(
        lm,
        candidates,
        harmful,
        harmless,
        tokens=tokens,
        batch_size=batch_size,
        system=system,
        progress=progress,
    )
    return choose_admissible(
        candidates, table, max_kl=max_kl, min_effect=min_effect, rank_by=rank_by
    )


def _check_choice(max_kl: float, rank_by: str) -> None:
    if rank_by not in ("effect", "bypass_effect", "induce_effect"):
        raise ConfigError(
            f"unknown rank_by {rank_by!r}: use effect, bypass_effect or induce_effect"
        )
    if max_kl < 0:
        raise SafegeomError(f"max_kl must be ≥ 0, got {max_kl}")


def choose_admissible(
    candidates: Sequence[Carrier],
    table: pd.DataFrame,
    *,
    max_kl: float = 0.1,
    min_effect: float = 0.0,
    rank_by: RankBy = "effect",
) -> Carrier:
    """The best admissible candidate of a scored table (no model): ``kl ≤ max_kl`` and
    ``rank_by > min_effect``, highest ``rank_by`` (ties: the earlier candidate).

    Args:
        candidates: the carriers ``table`` scores, in its row order.
        table: :func:`admissibility_table` of ``candidates`` (its ``attrs`` hold the base scores).

    Returns:
        The chosen candidate as in :func:`admissible_carrier`.

    Raises:
        ConfigError: an unknown ``rank_by``; SafegeomError: a negative ``max_kl``, a table of
            another length, or no admissible candidate (the message lists the lowest-KL ones).
    """
    _check_choice(max_kl, rank_by)
    if len(table) != len(candidates):
        raise SafegeomError(
            f"the table scores {len(table)} candidates but {len(candidates)} were given; pass "
            "the candidates the table was computed for"
        )
    ok = table[(table["kl"] <= max_kl) & (table[rank_by] > min_effect)]
    if ok.empty:
        closest = table.sort_values("kl").head(3)[["candidate", "layer", "kl", rank_by]]
        raise SafegeomError(
            f"no candidate is admissible (KL ≤ {max_kl} and {rank_by} > {min_effect}); "
            f"lowest KL: {closest.to_dict('records')}"
        )
    pick = int(ok.sort_values(rank_by, ascending=False, kind="stable").iloc[0]["candidate"])
    row = table.loc[pick]
    chosen = candidates[pick]
    keys = ("kl", "bypass", "induce", "bypass_effect", "induce_effect", "effect")
    return replace(
        chosen,
        method="admissible",
        scores={
            **chosen.scores,
            **{key: float(row[key]) for key in keys},
            **table.attrs,
            "max_kl": float(max_kl),
            "n_candidates": float(len(table)),
            "n_admissible": float(len(ok)),
        },
        provenance={**chosen.provenance, "source_method": chosen.method, "rank_by": rank_by},
    )
