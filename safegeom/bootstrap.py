"""Percentile bootstrap confidence intervals, and :class:`Metric`: one number with its interval.

Results that carry metrics live with the code that makes them (:class:`safegeom.eval_result.EvalResult`).

Plain numpy, deterministic by seed: the same values, statistic, ``n_resamples``, ``confidence``
and ``seed`` always give the same interval. Items (rows of ``values``) are resampled with
replacement; the interval is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles
(numpy's default linear interpolation) of the statistic over the resamples.

Edge cases: one item, or all items equal, give a zero-width interval at the statistic itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from safegeom.errors import ConfigError

__all__ = ["Metric", "bootstrap_ci", "bootstrap_diff_ci"]

Statistic = Callable[..., Any]
"""Maps an array of items (resampled along axis 0) to a float."""

_AXIS_AWARE: tuple[Statistic, ...] = (
    np.mean,
    np.median,
    np.sum,
    np.std,
    np.var,
    np.nanmean,
    np.nanmedian,
)
"""Statistics that accept ``axis=``; for 1-D values they are evaluated on all resamples at once."""


def _as_items(values: ArrayLike, what: str = "values") -> NDArray[Any]:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0:
        array = array[None]
    if array.shape[0] == 0:
        raise ConfigError(f"bootstrap needs at least one item in {what}, got none")
    return array


def _check(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise ConfigError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must lie strictly between 0 and 1, got {confidence}")


def _resampled(
    values: NDArray[Any], statistic: Statistic, index: NDArray[np.intp]
) -> NDArray[np.float64]:
    """The statistic on every resample (``index``: ``[n_resamples, n]`` item indices)."""
    if values.ndim == 1 and statistic in _AXIS_AWARE:
        return np.asarray(statistic(values[index], axis=1), dtype=np.float64)
    return np.array([float(statistic(values[row])) for row in index], dtype=np.float64)


def _interval(stats: NDArray[np.float64], confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(stats, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return float(low), float(high)


def _constant(values: NDArray[Any]) -> bool:
    return values.shape[0] == 1 or bool(np.all(values == values[:1]))


def bootstrap_ci(
    values: ArrayLike,
    statistic: Statistic = np.mean,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``statistic(values)``.

    Args:
        values: the items; a 1-D array, or an ``[n, k]`` array whose rows are resampled together
            (e.g. ``[[nll_sum, n_tokens], ...]`` with a ratio statistic).
        statistic: maps an array of items to a float (default: the mean).
        n_resamples: number of bootstrap resamples.
        confidence: coverage of the interval, in (0, 1).
        seed: seed of numpy's ``default_rng``; the result depends only on it and the inputs.

    Returns:
        ``(low, high)`` in the units of the statistic. One item or identical items: both equal
        ``statistic(values)``.

    Raises:
        ConfigError: no items, ``n_resamples < 1`` or ``confidence`` outside (0, 1).
    """
    _check(n_resamples, confidence)
    items = _as_items(values)
    if _constant(items):
        point = float(statistic(items))
        return point, point
    rng = np.random.default_rng(seed)
    index = rng.integers(0, items.shape[0], size=(n_resamples, items.shape[0]))
    return _interval(_resampled(items, statistic, index), confidence)


def bootstrap_diff_ci(
    a: ArrayLike,
    b: ArrayLike,
    statistic: Statistic = np.mean,
    *,
    paired: bool = True,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap interval of ``statistic(a) - statistic(b)`` (e.g. effect − matched control).

    With ``paired=True`` (the default) ``a`` and ``b`` must have the same number of items and are
    resampled with the same indices, so per-item pairing (same prompt under two conditions) is
    kept. With ``paired=False`` each is resampled independently (from its own generator stream).

    Returns:
        ``(low, high)`` in the units of the statistic.

    Raises:
        ConfigError: empty inputs, unequal lengths when paired, or bad ``n_resamples``/``confidence``.
    """
    _check(n_resamples, confidence)
    xa, xb = _as_items(a, "a"), _as_items(b, "b")
    if paired and xa.shape[0] != xb.shape[0]:
        raise ConfigError(
            f"paired bootstrap needs as many items in a as in b, got {xa.shape[0]} and "
            f"{xb.shape[0]}; pass paired=False for independent samples"
        )
    if _constant(xa) and _constant(xb):
        point = float(statistic(xa)) - float(statistic(xb))
        return point, point
    rng = np.random.default_rng(seed)
    index_a = rng.integers(0, xa.shape[0], size=(n_resamples, xa.shape[0]))
    index_b = index_a if paired else rng.integers(0, xb.shape[0], size=(n_resamples, xb.shape[0]))
    diff = _resampled(xa, statistic, index_a) - _resampled(xb, statistic, index_b)
    return _interval(diff, confidence)


@dataclass(frozen=True)
class Metric:
    """One number with its bootstrap confidence interval and how it was produced.

    ``value`` is the statistic on all items; ``[ci_low, ci_high]`` its percentile bootstrap
    interval (``detail["confidence"]``, default 0.95); ``n`` the number of items (prompts);
    ``judge`` the name of the judge that produced the underlying judgements (``None`` for metrics
    that need none, such as cross-entropy); ``detail`` further JSON-ready facts (units, ...).
    """

    name: str
    value: float
    ci_low: float
    ci_high: float
    n: int
    judge: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_values(
        cls,
        name: str,
        values: ArrayLike,
        statistic: Statistic = np.mean,
        *,
        judge: str | None = None,
        detail: Mapping[str, Any] | None = None,
        n_resamples: int = 1000,
        confidence: float = 0.95,
        seed: int = 0,
    ) -> Metric:
        """Compute ``statistic(values)`` and its bootstrap interval (see :func:`bootstrap_ci`)."""
        items = _as_items(values)
        low, high = bootstrap_ci(
            items, statistic, n_resamples=n_resamples, confidence=confidence, seed=seed
        )
        info = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed}
        info.update(detail or {})
        return cls(name, float(statistic(items)), low, high, int(items.shape[0]), judge, info)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        return {
            "name": self.name,
            "value": self.value,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "n": self.n,
            "judge": self.judge,
            "detail": dict(self.detail),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Metric:
        """Rebuild from :meth:`to_dict` output."""
        return cls(
            name=str(data["name"]),
            value=float(data["value"]),
            ci_low=float(data["ci_low"]),
            ci_high=float(data["ci_high"]),
            n=int(data["n"]),
            judge=data.get("judge"),
            detail=dict(data.get("detail") or {}),
        )
