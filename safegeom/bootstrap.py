"""Percentile bootstrap confidence intervals, and the result values that carry them.

:class:`Metric` is one number with its interval; :class:`EvalResult` is a behavioural evaluation
(:func:`safegeom.evaluate.evaluate`): completions, judgements, scores, metrics and provenance.

Plain numpy, deterministic by seed: the same values, statistic, ``n_resamples``, ``confidence``
and ``seed`` always give the same interval. Items (rows of ``values``) are resampled with
replacement; the interval is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles
(numpy's default linear interpolation) of the statistic over the resamples.

Edge cases: one item, or all items equal, give a zero-width interval at the statistic itself.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["FORMAT", "EvalResult", "Metric", "bootstrap_ci", "bootstrap_diff_ci"]

FORMAT = "safegeom.eval/1"
"""Format tag of saved :class:`EvalResult` JSON files."""

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
        raise ValueError(f"bootstrap needs at least one item in {what}, got none")
    return array


def _check(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")


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
        ValueError: no items, ``n_resamples < 1`` or ``confidence`` outside (0, 1).
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
        ValueError: empty inputs, unequal lengths when paired, or bad ``n_resamples``/``confidence``.
    """
    _check(n_resamples, confidence)
    xa, xb = _as_items(a, "a"), _as_items(b, "b")
    if paired and xa.shape[0] != xb.shape[0]:
        raise ValueError(
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


@dataclass(frozen=True)
class EvalResult:
    """What :func:`safegeom.evaluate.evaluate` found for one model on one prompt set.

    ``refused[i]`` is the judge's verdict on ``completions[i]`` (``True`` = refused); ``scores``
    the refusal scores (log-odds, nats; ``None`` if not computed). ``metrics`` holds at least
    ``refusal_rate`` and ``asr`` (fractions), and ``mean_refusal_score`` when scores exist.
    ``provenance``: model name, weight hash, prompt set name and content hash, judge, settings.
    """

    prompts: tuple[str, ...]
    completions: tuple[str, ...]
    refused: tuple[bool, ...]
    scores: tuple[float, ...] | None
    judge: str
    metrics: Mapping[str, Metric]
    provenance: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of prompts."""
        return len(self.prompts)

    @property
    def refusal_rate(self) -> Metric:
        """Fraction of completions judged refusals."""
        return self.metrics["refusal_rate"]

    @property
    def asr(self) -> Metric:
        """Attack success rate: fraction not refused."""
        return self.metrics["asr"]

    @property
    def mean_refusal_score(self) -> Metric | None:
        """Mean refusal score (log-odds, nats), if scores were computed."""
        return self.metrics.get("mean_refusal_score")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: headline values and ``[low, high]`` CIs at the top level (``refusal_rate``,
        ``refusal_rate_ci``, ``asr``, ``asr_ci``, ``mean_refusal_score``, ...), then every metric
        in full, the per-prompt data and the provenance."""
        out: dict[str, Any] = {"format": FORMAT, "n": self.n, "judge": self.judge}
        for name in ("refusal_rate", "asr", "mean_refusal_score"):
            metric = self.metrics.get(name)
            out[name] = None if metric is None else metric.value
            out[f"{name}_ci"] = None if metric is None else [metric.ci_low, metric.ci_high]
        out["metrics"] = {name: m.to_dict() for name, m in self.metrics.items()}
        out["prompts"] = list(self.prompts)
        out["completions"] = list(self.completions)
        out["refused"] = list(self.refused)
        out["scores"] = None if self.scores is None else list(self.scores)
        out["provenance"] = dict(self.provenance)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalResult:
        """Rebuild from :meth:`to_dict` output.

        Raises:
            ValueError: the mapping is not a saved evaluation.
        """
        if data.get("format") != FORMAT:
            raise ValueError(f"not a safegeom evaluation (format {data.get('format')!r})")
        scores = data.get("scores")
        return cls(
            prompts=tuple(data["prompts"]),
            completions=tuple(data["completions"]),
            refused=tuple(bool(r) for r in data["refused"]),
            scores=None if scores is None else tuple(float(s) for s in scores),
            judge=str(data["judge"]),
            metrics={k: Metric.from_dict(v) for k, v in data["metrics"].items()},
            provenance=dict(data.get("provenance") or {}),
        )

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (temporary file + rename). Returns the path written."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2, sort_keys=True)
        os.replace(tmp, target)
        return target

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        """Read a file written by :meth:`save`.

        Raises:
            ValueError: the file is not JSON or not a saved evaluation.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not JSON: {err}") from None
        return cls.from_dict(data)
