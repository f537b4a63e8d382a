"""Refusal cones without gradients: the *cheap cone* (docs/methods.md §3, ours), and cone scoring.

Wollschläger et al. 2025 find multi-dimensional refusal *cones* by gradient descent (see
:mod:`safegeom.carriers.rdo`). The cheap cone is **our proposal**, the default when no gradients
are wanted: at one layer, orthonormalise (greedy Gram–Schmidt, i.e. QR with rank skipping)

1. the diff-in-means vectors of several sources, either every ``t_post`` position (last first,
   ``source="positions"``) or every harm category of the harmful set after the overall
   diff-in-means (``source="categories"``, from ``PromptSet.categories``), then
2. the top ``n_svd`` right singular vectors of the per-prompt differences
   ``h_i − mean_harmless`` at ``t_post[-1]``, scaled by ``σ/√n`` (activation units),

and keep the first ``k`` independent directions. Every choice here is configurable. The maths is
:func:`~safegeom.carriers.fit.cone_basis` (activations in); :func:`cheap_cone` captures, fits and
scores.

:func:`score_cone` scores a cone as the paper does: each basis vector and random positive-orthant
combinations ``normalise(sᵀB)``, ``s = |N(0, I_k)|``, must ablate (bypass) and induce refusal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from safegeom.activations import CaptureConfig, capture
from safegeom.carriers.candidate_scores import score_candidates
from safegeom.carriers.carrier import Carrier
from safegeom.carriers.fit import cone_basis, gram_schmidt
from safegeom.carriers.inputs import (
    Prompts,
    as_prompts,
    check_k,
    default_layer,
    encode,
    prompt_provenance,
)
from safegeom.errors import ConfigError, SafegeomError
from safegeom.evaluation import refusal_token_ids
from safegeom.models.chat import EncodedSet
from safegeom.models.loading import LoadedModel

__all__ = ["cheap_cone", "cone_directions", "gram_schmidt", "score_cone"]


def cone_directions(
    basis: Float[Tensor, "k d"], n_combinations: int, *, seed: int = 0
) -> Float[Tensor, "m d"]:
    """Unit directions of a cone: its ``k`` basis rows, then ``n_combinations`` random
    positive-orthant combinations ``normalise(sᵀB)``, ``s = |N(0, I_k)|`` (seeded)."""
    b = basis.double()
    b = b / b.norm(dim=-1, keepdim=True)
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(n_combinations, b.shape[0], generator=gen, dtype=torch.float64).abs()
    combos = s @ b
    return torch.cat([b, combos / combos.norm(dim=-1, keepdim=True)])


def score_cone(
    lm: LoadedModel,
    basis: Float[Tensor, "k d"],
    alpha: float,
    layer: int,
    harmful: Prompts | EncodedSet,
    harmless: Prompts | EncodedSet,
    *,
    n_combinations: int = 8,
    seed: int = 0,
    batch_size: int = 64,
    tokens: Sequence[int] | None = None,
    system: str | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Bypass, induce and KL scores of every basis vector and of random cone combinations.

    Each unit direction ``u`` is ablated at every layer and site (bypass: mean refusal score on
    ``harmful``; KL: mean KL(base ‖ ablated) on ``harmless``, nats) and ``alpha·u`` is added at
    ``layer`` on ``harmless`` (induce). Scores are refusal log-odds (nats), batched through
    :func:`~safegeom.carriers.candidate_scores.score_candidates`.

    Returns:
        ``bypass_j``, ``induce_j``, ``kl_j`` per basis vector ``j``; ``comb_bypass_mean``,
        ``comb_bypass_max`` (worst), ``comb_induce_mean``, ``comb_induce_min`` (worst),
        ``comb_kl_mean`` over the combinations; ``base_harmful``, ``base_harmless``.
    """

    ids = refusal_token_ids(lm, tokens)
    enc = [encode(lm, p, system).encoded for p in (harmful, harmless)]
    k = basis.shape[0]
    dirs = cone_directions(basis, n_combinations, seed=seed) * alpha
    s = score_candidates(
        lm,
        dirs.float(),
        [layer] * len(dirs),
        enc[0],
        enc[1],
        ids,
        batch_size=batch_size,
        progress=progress,
    )
    out: dict[str, float] = {}
    for j in range(k):
        out |= {
            f"bypass_{j}": float(s.bypass[j]),
            f"induce_{j}": float(s.induce[j]),
            f"kl_{j}": float(s.kl[j]),
        }
    if n_combinations:
        out |= {
            "comb_bypass_mean": float(s.bypass[k:].mean()),
            "comb_bypass_max": float(s.bypass[k:].max()),
            "comb_induce_mean": float(s.induce[k:].mean()),
            "comb_induce_min": float(s.induce[k:].min()),
            "comb_kl_mean": float(s.kl[k:].mean()),
        }
    return out | {"base_harmful": s.base_harmful, "base_harmless": s.base_harmless}


def cheap_cone(
    lm: LoadedModel,
    harmful: Prompts | EncodedSet,
    harmless: Prompts | EncodedSet,
    *,
    k: int = 3,
    layer: int | None = None,
    refusal: Carrier | None = None,
    source: Literal["positions", "categories"] = "positions",
    n_svd: int | None = None,
    score: bool = True,
    harmful_val: Prompts | EncodedSet | None = None,
    harmless_val: Prompts | EncodedSet | None = None,
    n_combinations: int = 8,
    seed: int = 0,
    kind: str = "refusal",
    batch_size: int = 64,
    system: str | None = None,
    progress: bool = False,
) -> Carrier:
    """The cheap refusal cone (ours, docs/methods.md §3): ``k`` orthonormal directions, one layer.

    Args:
        lm: the model.
        harmful, harmless: prompt sets for the means (``harmful`` needs ``categories`` for
            ``source="categories"``).
        k: cone dimension, 1 ≤ k ≤ d (the papers use 2–5).
        layer: the layer; default the layer of ``refusal`` when given, else the middle layer.
        refusal: an optional refusal carrier whose layer is reused.
        source: ``positions`` (diff-in-means at every ``t_post`` token) or ``categories``
            (the overall diff-in-means at ``t_post[-1]``, then one per harm category).
        n_svd: number of singular vectors of the per-prompt differences appended (default ``k``).
        score: score the basis and ``n_combinations`` random combinations (:func:`score_cone`)
            on ``harmful_val``/``harmless_val`` (default: the fitting prompts).
        seed: seed of the combinations.
        kind: what the cone carries (stored on the carrier).

    Returns:
        A :class:`Carrier` with ``k`` orthonormal rows (``method="cone-cheap"``), the first along
        the diff-in-means at ``t_post[-1]``. ``scores``: ``alpha`` (norm of that diff-in-means,
        activation units, used as the addition scale), ``effective_rank`` of the stacked raw
        source vectors (:func:`safegeom.geometry.effective_rank`), ``n_raw`` and, when scored,
        those of :func:`score_cone`.

    Raises:
        SafegeomError: an empty prompt set, a layer or ``k`` out of range, an unknown source, a set
            without categories, or sources spanning fewer than ``k`` dimensions.
    """
    h_set, s_set = as_prompts(harmful), as_prompts(harmless)
    check_k(k, lm.d_model)
    at = default_layer(lm, layer, refusal)
    if source not in ("positions", "categories"):
        raise ConfigError(f"unknown cone source {source!r}: use positions or categories")
    if source == "categories" and getattr(h_set, "categories", None) is None:
        raise SafegeomError(
            f"prompt set {h_set.name!r} has no categories; use source='positions' or a set "
            "with categories (directharm4, jbb-harmful)"
        )
    if n_svd is not None and n_svd < 0:
        raise SafegeomError(f"n_svd must be ≥ 0, got {n_svd}")
    acts = [
        capture(
            lm,
            p,
            CaptureConfig(layers=[at], positions="t_post", dtype=torch.float32, system=system),
            progress=progress,
        )
        for p in (h_set, s_set)
    ]
    if acts[0].positions != acts[1].positions:
        raise SafegeomError(
            "harmful and harmless prompts have different post-instruction positions"
        )
    fitted = cone_basis(
        acts[0]["resid_pre"][:, 0],
        acts[1]["resid_pre"][:, 0],
        k,
        positions=acts[0].positions,
        source=source,
        categories=getattr(h_set, "categories", None),
        n_svd=n_svd,
    )
    scores = dict(fitted.scores)
    if score:
        scores |= score_cone(
            lm,
            fitted.vectors,
            scores["alpha"],
            at,
            harmful_val if harmful_val is not None else h_set,
            harmless_val if harmless_val is not None else s_set,
            n_combinations=n_combinations,
            seed=seed,
            batch_size=batch_size,
            system=system,
            progress=progress,
        )
    provenance = prompt_provenance(lm, h_set, s_set, **fitted.extra, seed=seed, system=system)
    return Carrier(
        vectors=fitted.vectors,
        kind=kind,
        method="cone-cheap",
        site="resid_pre",
        layer=at,
        position="t_post" if source == "positions" else "t_post[-1]",
        scores=scores,
        provenance=provenance,
    )
