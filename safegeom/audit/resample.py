"""Carriers refitted on many prompt resamples at once: bootstrap draws and split halves as weights.

A resample of the carrier prompts is a row of per-prompt counts (:class:`Draws`): a bootstrap
draw counts how often each prompt was drawn (``n`` draws with replacement per class); a split
half counts 1 for the prompts of one half and 0 elsewhere. Class means of every resample are then
one matrix product (``counts @ activations / n``), and the refits here are the pure fit functions
of :mod:`safegeom.carriers.fit` in batch form, on float64:

- :func:`directions`: :func:`~safegeom.carriers.fit.diff_in_means` of every resample;
- :func:`cone_bases`: :func:`~safegeom.carriers.fit.cone_basis` (``source="positions"``) of every
  resample: the same sources (diff-in-means at every position, last first, then the top ``k``
  singular directions of the per-prompt differences, scaled by ``σ/√n``), orthonormalised in order
  by a batched QR (Gram–Schmidt up to float rounding); a resample whose sources are dependent
  among the first ``k`` is refitted by :func:`~safegeom.carriers.fit.cone_basis` itself, one at a
  time.

A repeated prompt enters a bootstrap SVD as its row scaled by ``√count``, which has the same
right singular vectors and values as the row repeated; the singular directions come from the
``n × n`` Gram matrix of the per-prompt differences (:func:`_singular_sources`). Nothing here runs a model: the audit feeds
the activations it already captured (:class:`~safegeom.audit.activations.CarrierActivations`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from safegeom.carriers.fit import cone_basis
from safegeom.errors import SafegeomError

__all__ = [
    "Draws",
    "bootstrap_draws",
    "cone_bases",
    "directions",
    "percentile_interval",
    "split_halves",
]

_REL_TOL = 1e-6
"""Gram–Schmidt's tolerance for a dependent source (as :func:`~safegeom.carriers.fit.gram_schmidt`)."""


@dataclass(frozen=True)
class Draws:
    """Per-prompt counts of ``R`` resamples of both classes (float64)."""

    harmful: Float[Tensor, "R n"]
    """How often each harmful prompt is in each resample."""
    harmless: Float[Tensor, "R m"]
    """How often each harmless prompt is in each resample."""

    def __post_init__(self) -> None:
        if self.harmful.shape[0] != self.harmless.shape[0]:
            raise SafegeomError(
                f"{self.harmful.shape[0]} harmful and {self.harmless.shape[0]} harmless resamples; "
                "draw both classes for every resample"
            )
        for name, counts in (("harmful", self.harmful), ("harmless", self.harmless)):
            if bool((counts.sum(1) < 1).any()):
                raise SafegeomError(
                    f"a resample holds no {name} prompt; draw at least one per class"
                )

    @property
    def size(self) -> int:
        """The number of resamples ``R``."""
        return int(self.harmful.shape[0])


def _counts(index: Tensor, n: int) -> Tensor:
    """Counts ``[R, n]`` (float64) of the prompt indices ``[R, draws]``."""
    out = torch.zeros(index.shape[0], n, dtype=torch.float64)
    return out.scatter_add_(1, index, torch.ones(index.shape, dtype=torch.float64))


def bootstrap_draws(n: int, m: int, n_resamples: int, generator: torch.Generator) -> Draws:
    """``n_resamples`` stratified bootstrap draws: ``n`` harmful and ``m`` harmless prompts drawn
    with replacement, each class on its own.

    Returns:
        :class:`Draws` whose rows sum to ``n`` and ``m``.

    Raises:
        SafegeomError: a class with no prompt, or fewer than one resample.
    """
    if n < 1 or m < 1 or n_resamples < 1:
        raise SafegeomError(
            f"a bootstrap needs prompts in both classes and at least one resample (got n={n}, "
            f"m={m}, resamples={n_resamples}); raise n_per_class or n_resamples"
        )
    harmful = torch.randint(0, n, (n_resamples, n), generator=generator)
    harmless = torch.randint(0, m, (n_resamples, m), generator=generator)
    return Draws(_counts(harmful, n), _counts(harmless, m))


def split_halves(n: int, m: int, n_splits: int, generator: torch.Generator) -> tuple[Draws, Draws]:
    """``n_splits`` random splits of each class into two disjoint halves of ``n // 2`` and
    ``m // 2`` prompts (an odd class leaves one prompt out of each split).

    Returns:
        ``(first halves, second halves)``: 0/1 counts, disjoint in every split.

    Raises:
        SafegeomError: a class of fewer than 2 prompts (no two halves).
    """
    if n < 2 or m < 2 or n_splits < 1:
        raise SafegeomError(
            f"split halves need at least 2 prompts per class and one split (got n={n}, m={m}, "
            f"splits={n_splits}); raise n_per_class"
        )
    halves: list[list[Tensor]] = [[], []]
    for size in (n, m):
        order = torch.rand(n_splits, size, generator=generator).argsort(1)
        half = size // 2
        for j, index in enumerate((order[:, :half], order[:, half : 2 * half])):
            halves[j].append(_counts(index, size))
    return Draws(*halves[0]), Draws(*halves[1])


def _means(counts: Float[Tensor, "R n"], x: Tensor) -> Tensor:
    """Weighted class means ``[R, *x.shape[1:]]`` of ``x`` ``[n, ...]`` under ``counts``."""
    flat = counts @ x.reshape(x.shape[0], -1)
    return (flat / counts.sum(1, keepdim=True)).reshape(counts.shape[0], *x.shape[1:])


def directions(
    draws: Draws, harmful: Float[Tensor, "n d"], harmless: Float[Tensor, "m d"]
) -> Float[Tensor, "R d"]:
    """The diff-in-means ``mean_harmful − mean_harmless`` of every resample, in activation units.

    Returns:
        ``[R, d]`` float64, row ``i`` equal to
        :func:`~safegeom.carriers.fit.diff_in_means` on resample ``i``'s prompts.
    """
    return _means(draws.harmful, harmful.double()) - _means(draws.harmless, harmless.double())


def _orthonormal(stacked: Float[Tensor, "R s d"], k: int) -> tuple[Tensor, Tensor]:
    """The first ``k`` Gram–Schmidt rows of every resample's sources, by one batched QR.

    Returns:
        ``(bases [R, k, d], ok [R])``: ``ok`` is false where a source among the first ``k`` is
        dependent on earlier ones (then Gram–Schmidt would skip it and the QR row is wrong).
    """
    q, r = torch.linalg.qr(stacked[:, :k].transpose(1, 2))
    diag = torch.diagonal(r, dim1=1, dim2=2)  # [R, k]
    norms = stacked[:, :k].norm(dim=-1)
    ok = (diag.abs() > _REL_TOL * norms.clamp_min(1e-300)).all(1)
    signs = torch.where(diag < 0, -1.0, 1.0).to(q.dtype)
    return (q * signs[:, None, :]).transpose(1, 2), ok


def _effective_rank(stacked: Float[Tensor, "R s d"]) -> Float[Tensor, " R"]:
    """``exp(entropy(σ/Σσ))`` of every resample's stacked sources (as
    :func:`safegeom.geometry.effective_rank`)."""
    s = torch.linalg.svdvals(stacked)
    p = s / s.sum(1, keepdim=True)
    plogp = torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))
    return torch.exp(-plogp.sum(1))


def _singular_sources(
    draws: Draws, last: Float[Tensor, "n d"], mean_harmless: Float[Tensor, "R d"], k: int
) -> Float[Tensor, "R t d"]:
    """The cone's singular sources of every resample: the top ``t = min(k, n, d)`` right singular
    vectors ``v`` of the per-prompt differences ``W = √c ⊙ (h_i − mean_harmless)`` scaled by
    ``σ/√n``, from the smaller of the two Gram matrices (``W Wᵀ``, ``n × n``, where ``n ≤ d``:
    ``σ v = Wᵀ u``; else ``Wᵀ W``, ``d × d``), each built without forming ``[R, n, d]``."""
    counts = draws.harmful
    size = counts.sum(1)[:, None, None]  # [R, 1, 1]
    n, d = last.shape
    top = min(k, n, d)
    if n <= d:
        c = counts.sqrt()  # a repeated row enters as √count × the row
        cross = mean_harmless @ last.T  # [R, n]
        sq = (mean_harmless**2).sum(-1)[:, None, None]
        g = (last @ last.T)[None] - cross[:, :, None] - cross[:, None, :] + sq
        _, vecs = torch.linalg.eigh(g * c[:, :, None] * c[:, None, :])  # ascending eigenvalues
        u = c[:, :, None] * vecs[:, :, -top:].flip(2)  # [R, n, t], largest first
        sources = (
            torch.einsum("nd,rnt->rtd", last, u) - mean_harmless[:, None] * u.sum(1)[..., None]
        )
        return sources / size.sqrt()
    sums = counts @ last  # [R, d]
    outer = sums[:, :, None] * mean_harmless[:, None, :]
    cov = torch.einsum("rn,nd,ne->rde", counts, last, last) - outer - outer.transpose(1, 2)
    cov = cov + size * mean_harmless[:, :, None] * mean_harmless[:, None, :]
    values, vecs = torch.linalg.eigh(cov)
    scale = (values[:, -top:].flip(1).clamp_min(0.0)[:, :, None] / size).sqrt()
    return vecs[:, :, -top:].flip(2).transpose(1, 2) * scale


def cone_bases(
    draws: Draws,
    harmful: Float[Tensor, "n pos d"],
    harmless: Float[Tensor, "m pos d"],
    k: int,
    *,
    positions: Sequence[str],
    noise: float = 0.0,
) -> tuple[Float[Tensor, "R k d"], Float[Tensor, " R"]]:
    """The cheap cone (:func:`~safegeom.carriers.fit.cone_basis`, ``source="positions"``,
    ``n_svd = k``) of every resample.

    Returns:
        ``(bases, effective_rank)``: ``[R, k, d]`` orthonormal float64 rows and the effective rank
        of each resample's stacked sources; both NaN for a resample where the cone is undefined
        (sources at the noise level, or spanning fewer than ``k`` dimensions).
    """
    h, s = harmful.double(), harmless.double()
    mean_h, mean_s = _means(draws.harmful, h), _means(draws.harmless, s)  # [R, pos, d]
    raw = (mean_h - mean_s).flip(1)  # the last position first
    stacked = torch.cat([raw, _singular_sources(draws, h[:, -1], mean_s[:, -1], k)], dim=1)
    bases, ok = _orthonormal(stacked, k) if stacked.shape[1] >= k else (None, None)
    if bases is None:
        bases = torch.full((draws.size, k, h.shape[-1]), float("nan"), dtype=torch.float64)
        ok = torch.zeros(draws.size, dtype=torch.bool)
    rank = _effective_rank(stacked)
    live = stacked.flatten(1).norm(dim=1) > noise if noise else torch.ones_like(ok)
    for i in torch.nonzero(live & ~ok).flatten().tolist():
        bases[i], rank[i] = _refit_one(draws, i, h, s, k, positions)
    bases[~live] = float("nan")
    rank[~live] = float("nan")
    return bases, rank


def _refit_one(
    draws: Draws, i: int, h: Tensor, s: Tensor, k: int, positions: Sequence[str]
) -> tuple[Tensor, Tensor]:
    """Resample ``i``'s cone by :func:`~safegeom.carriers.fit.cone_basis` (dependent sources)."""
    rows_h = torch.repeat_interleave(torch.arange(len(h)), draws.harmful[i].long())
    rows_s = torch.repeat_interleave(torch.arange(len(s)), draws.harmless[i].long())
    try:
        fit = cone_basis(h[rows_h], s[rows_s], k, positions=positions)
    except SafegeomError:
        nan = torch.full((k, h.shape[-1]), float("nan"), dtype=torch.float64)
        return nan, torch.tensor(float("nan"), dtype=torch.float64)
    rank = torch.tensor(fit.scores["effective_rank"], dtype=torch.float64)
    return fit.vectors, rank


def percentile_interval(
    samples: Float[Tensor, " R"], estimate: float, level: float = 0.95
) -> tuple[float, float]:
    """The percentile interval of the finite ``samples`` at ``level``, widened to contain
    ``estimate`` (a statistic on a boundary, such as drift 0 of the base against itself, has
    every resample on one side of it).

    Returns:
        ``(low, high)`` in the statistic's units; ``(nan, nan)`` without a finite sample.
    """
    x = samples[torch.isfinite(samples)].double()
    if not len(x):
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0
    low, high = torch.quantile(x, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return min(low, estimate), max(high, estimate)
