"""Carrier maths on activations: tensors in, a fitted carrier out (no model, no capture, no ranks).

The extraction functions (:func:`~safegeom.carriers.harmfulness.harmfulness_direction`,
:func:`~safegeom.carriers.cones.cheap_cone`, ...) capture activations, call these and score the
result; the audit calls them on its own capture. Each fit has two forms:

- the maths, returning :class:`Fitted` (float64 vectors, scores, what it was made from), which the
  audit compares across checkpoints in float64;
- the carrier, returning a :class:`~safegeom.carriers.carrier.Carrier` (:func:`fit_dim`,
  :func:`fit_cone`), which stores its vectors in float32 like every carrier.

Fits:

- :func:`diff_in_means`: ``mean_harmful − mean_harmless`` (the refusal and harmfulness directions,
  docs/methods.md §1–2);
- :func:`cone_basis`: the cheap refusal cone (ours, docs/methods.md §3): the diff-in-means of
  several sources (every ``t_post`` position, last first, or every harm category after the overall
  one), then the top ``n_svd`` right singular vectors of the per-prompt differences
  ``h_i − mean_harmless`` at the last position scaled by ``σ/√n``, orthonormalised by
  :func:`gram_schmidt` into ``k`` rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from safegeom.artifacts import Provenance
from safegeom.carriers.carrier import Carrier
from safegeom.errors import ConfigError, SafegeomError
from safegeom.geometry import effective_rank

__all__ = [
    "Fitted",
    "cone_basis",
    "diff_in_means",
    "fit_cone",
    "fit_dim",
    "gram_schmidt",
]


@dataclass(frozen=True)
class Fitted:
    """What a fit computed from activations, before it becomes a :class:`Carrier`."""

    vectors: Tensor
    """Float64: ``[d]`` for a direction (compared by cosine), ``[k, d]`` orthonormal rows for a
    subspace (compared by principal angles)."""
    scores: Mapping[str, float] = field(default_factory=dict)
    """Numbers the fit measured on the way (e.g. ``norm``, ``alpha``, ``effective_rank``)."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """What it was made from, for the carrier's provenance (e.g. the cone's source vectors)."""

    def carrier(
        self,
        *,
        kind: str,
        method: str,
        layer: int,
        position: str,
        site: str = "resid_pre",
        provenance: Provenance | None = None,
    ) -> Carrier:
        """The fit as a :class:`Carrier` (vectors stored in float32).

        Returns:
            A carrier with these scores; its provenance is ``provenance`` with the fit's extras
            added (or the extras alone).
        """
        prov = provenance if provenance is not None else Provenance()
        if self.extra:
            prov = prov.with_extra(**self.extra)
        return Carrier(
            vectors=self.vectors,
            kind=kind,
            method=method,
            site=site,
            layer=layer,
            position=position,
            scores=dict(self.scores),
            provenance=prov,
        )


def _rows(x: Tensor, name: str, dims: int) -> Tensor:
    """``x`` in float64, checked to have ``dims`` axes and at least one row."""
    t = torch.as_tensor(x)
    if t.dim() != dims or t.shape[0] == 0:
        shape = "[n, d]" if dims == 2 else "[n, pos, d]"
        raise SafegeomError(
            f"{name} activations must be {shape} with n ≥ 1, got {tuple(t.shape)}; pass one row "
            "per prompt (a class mean already computed passes as one row)"
        )
    return t.double()


def _same_width(h: Tensor, s: Tensor) -> None:
    if h.shape[1:] != s.shape[1:]:
        raise SafegeomError(
            f"harmful and harmless activations differ in shape past the prompt axis "
            f"({tuple(h.shape[1:])} vs {tuple(s.shape[1:])}); read both at the same site and "
            "positions"
        )


def diff_in_means(harmful: Float[Tensor, "n d"], harmless: Float[Tensor, "m d"]) -> Fitted:
    """Diff-in-means ``mean_harmful − mean_harmless`` (float64), in activation units.

    A class mean already computed elsewhere (e.g. streamed by
    :func:`~safegeom.activations.capture_stats`) passes as a single row: its mean is itself.

    Returns:
        :class:`Fitted` with the raw ``[d]`` difference (zero where the classes agree) and score
        ``norm``.

    Raises:
        SafegeomError: inputs not ``[n, d]`` or of different widths.
    """
    h, s = _rows(harmful, "harmful", 2), _rows(harmless, "harmless", 2)
    _same_width(h, s)
    diff = h.mean(0) - s.mean(0)
    return Fitted(vectors=diff, scores={"norm": float(diff.norm())})


def fit_dim(
    harmful: Float[Tensor, "n d"],
    harmless: Float[Tensor, "m d"],
    *,
    kind: str,
    layer: int,
    position: str,
    site: str = "resid_pre",
) -> Carrier:
    """The diff-in-means direction as a :class:`Carrier` (``method="dim"``, docs/methods.md §1–2).

    Returns:
        A carrier whose single vector is the raw difference of means (its norm is meaningful for
        activation addition); ``scores``: ``norm``.

    Raises:
        SafegeomError: bad shapes (see :func:`diff_in_means`); ConfigError: the classes have equal
            means (no direction).
    """
    fitted = diff_in_means(harmful, harmless)
    return fitted.carrier(kind=kind, method="dim", layer=layer, position=position, site=site)


def gram_schmidt(
    vectors: Float[Tensor, "m d"], k: int, *, rel_tol: float = 1e-6
) -> Float[Tensor, "k d"]:
    """The first ``k`` orthonormal rows obtained from ``vectors`` in order (float64), skipping
    vectors whose residual is below ``rel_tol`` of their norm (dependent on earlier ones).

    Raises:
        SafegeomError: the vectors span fewer than ``k`` dimensions.
    """
    rows: list[Tensor] = []
    for v in vectors.double():
        r = v.clone()
        for _ in range(2):  # re-orthogonalise once for numerical safety
            for b in rows:
                r = r - (r @ b) * b
        if r.norm() > rel_tol * max(float(v.norm()), 1e-300):
            rows.append(r / r.norm())
        if len(rows) == k:
            return torch.stack(rows)
    raise SafegeomError(
        f"the cone's source vectors span only {len(rows)} dimensions, fewer than k={k}; "
        "lower k, raise n_svd or use more positions/categories"
    )


def _category_means(
    last: Float[Tensor, "n d"], categories: Sequence[str]
) -> tuple[list[str], list[Tensor]]:
    """Harm categories, most frequent first (ties by name), and the mean of each one's rows."""
    if len(categories) != len(last):
        raise SafegeomError(
            f"{len(categories)} categories for {len(last)} harmful prompts; pass one category "
            "per harmful prompt"
        )
    cats = list(categories)
    names = sorted(set(cats), key=lambda c: (-cats.count(c), c))
    means = []
    for name in names:
        rows = [i for i, c in enumerate(cats) if c == name]
        means.append(last[rows].mean(0))
    return names, means


def cone_basis(
    harmful: Float[Tensor, "n pos d"],
    harmless: Float[Tensor, "m pos d"],
    k: int,
    *,
    positions: Sequence[str],
    source: Literal["positions", "categories"] = "positions",
    categories: Sequence[str] | None = None,
    n_svd: int | None = None,
    noise: float = 0.0,
) -> Fitted:
    """The cheap refusal cone's basis from activations at the ``t_post`` positions (module
    docstring; our proposal, docs/methods.md §3).

    Args:
        harmful, harmless: per-prompt activations ``[n, pos, d]`` at the positions named by
            ``positions``, in template order (the last is ``t_post[-1]``).
        k: cone dimension, at least 1.
        positions: the labels of the position axis.
        source: ``positions`` (the diff-in-means at every position, last first) or ``categories``
            (the overall diff-in-means at the last position, then one per harm category).
        categories: the harm category of every harmful prompt (``source="categories"``).
        n_svd: singular vectors of the per-prompt differences appended (default ``k``).
        noise: source vectors whose joint norm is at most this count as none (float noise).

    Returns:
        :class:`Fitted` with ``k`` orthonormal float64 rows, the first along the diff-in-means at
        the last position; scores ``alpha`` (that diff-in-means' norm, activation units),
        ``effective_rank`` of the stacked raw sources, ``n_raw``; extras ``source``,
        ``raw_vectors`` (the sources' names) and ``n_svd``.

    Raises:
        ConfigError: an unknown source or ``k < 1``.
        SafegeomError: bad shapes, a negative ``n_svd``, missing categories, sources at the noise
            level, or sources spanning fewer than ``k`` dimensions.
    """
    if source not in ("positions", "categories"):
        raise ConfigError(f"unknown cone source {source!r}: use positions or categories")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"cone dimension k must be a whole number ≥ 1, got {k}")
    n_svd = k if n_svd is None else n_svd
    if n_svd < 0:
        raise SafegeomError(f"n_svd must be ≥ 0, got {n_svd}")
    h, s = _rows(harmful, "harmful", 3), _rows(harmless, "harmless", 3)
    _same_width(h, s)
    if len(positions) != h.shape[1]:
        raise SafegeomError(
            f"{len(positions)} position labels for {h.shape[1]} positions; label every position"
        )
    dim = h.mean(0) - s.mean(0)  # [pos, d]
    if source == "positions":
        raw = list(dim.flip(0))  # the last position first
        names = list(reversed(positions))
    else:
        if categories is None:
            raise SafegeomError(
                "source='categories' needs the harmful prompts' categories: pass categories= "
                "or use source='positions'"
            )
        cats, means = _category_means(h[:, -1], categories)
        raw = [dim[-1], *(m - s[:, -1].mean(0) for m in means)]
        names = ["all", *cats]
    if n_svd:
        diffs = h[:, -1] - s[:, -1].mean(0)
        _, sv, vh = torch.linalg.svd(diffs, full_matrices=False)
        top = min(n_svd, len(sv))
        raw += list(vh[:top] * (sv[:top, None] / len(diffs) ** 0.5))
        names += [f"svd{j}" for j in range(top)]
    stacked = torch.stack(raw)
    if noise and not bool(stacked.norm() > noise):
        raise SafegeomError(
            f"the cone's source vectors are zero up to float noise ({noise:.3g}): the classes do "
            "not differ at these positions; fit the cone at another layer"
        )
    basis = gram_schmidt(stacked, k)
    scores = {
        "alpha": float(dim[-1].norm()),
        "effective_rank": effective_rank(stacked),
        "n_raw": float(len(raw)),
    }
    return Fitted(
        vectors=basis,
        scores=scores,
        extra={"source": source, "raw_vectors": names, "n_svd": n_svd},
    )


def fit_cone(
    harmful: Float[Tensor, "n pos d"],
    harmless: Float[Tensor, "m pos d"],
    *,
    k: int,
    layer: int,
    positions: Sequence[str],
    source: Literal["positions", "categories"] = "positions",
    categories: Sequence[str] | None = None,
    n_svd: int | None = None,
    kind: str = "refusal",
) -> Carrier:
    """The cheap refusal cone as a :class:`Carrier` (``method="cone-cheap"``; see
    :func:`cone_basis` for the arguments).

    Returns:
        A carrier with ``k`` orthonormal rows at ``layer``, position ``t_post`` (``source=
        "positions"``) or ``t_post[-1]``; scores and provenance extras as :func:`cone_basis`'s.

    Raises:
        ConfigError, SafegeomError: as :func:`cone_basis`.
    """
    fitted = cone_basis(
        harmful,
        harmless,
        k,
        positions=positions,
        source=source,
        categories=categories,
        n_svd=n_svd,
    )
    position = "t_post" if source == "positions" else "t_post[-1]"
    return fitted.carrier(kind=kind, method="cone-cheap", layer=layer, position=position)
