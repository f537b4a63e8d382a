""":class:`EvalResult`: what :func:`safegeom.evaluation.evaluate` found, saved and loaded with provenance.

An evaluation is one model on one prompt set: completions, the judge's verdicts, refusal scores,
metrics with bootstrap CIs (:class:`~safegeom.bootstrap.Metric`) and the
:class:`~safegeom.artifacts.Provenance` (model, weight hash, prompt set and its hash, judge,
settings, and the intervention's description). It saves as one JSON file through the artifact
layer (:func:`~safegeom.artifacts.write_json`, atomic) and loads back equal.

Example:
    >>> import tempfile, pathlib
    >>> from safegeom.evaluation import EvaluateConfig, evaluate
    >>> from safegeom.models import load_model
    >>> from safegeom.prompts import load_prompts
    >>> lm = load_model("tiny-chat")
    >>> prompts, short = load_prompts("advbench:test", n=4), EvaluateConfig(max_new_tokens=8)
    >>> result = evaluate(lm, prompts, short, progress=False)
    >>> path = result.save(pathlib.Path(tempfile.mkdtemp()) / "eval.json")
    >>> EvalResult.load(path).asr.value == result.asr.value
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safegeom.artifacts import Provenance, read_json, write_json
from safegeom.bootstrap import Metric
from safegeom.errors import ArtifactError

__all__ = ["FORMAT", "EvalResult"]

FORMAT = "safegeom.eval/1"
"""Format tag of saved :class:`EvalResult` JSON files."""

_TYPED = ("model", "weight_hash", "prompt_sets", "config", "extra", "version", "created")


def provenance_from(data: Any) -> Mapping[str, Any]:
    """A saved provenance mapping back as a :class:`Provenance` when it was one, else a dict."""
    data = dict(data or {})
    if all(key in data for key in _TYPED):
        return Provenance.from_dict(data)
    return data


def provenance_dict(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-ready form of a provenance (typed: :meth:`Provenance.to_dict`; else a plain dict)."""
    if isinstance(provenance, Provenance):
        return provenance.to_dict()
    return dict(provenance)


@dataclass(frozen=True)
class EvalResult:
    """What :func:`safegeom.evaluation.evaluate` found for one model on one prompt set.

    ``refused[i]`` is the judge's verdict on ``completions[i]`` (``True`` = refused); ``scores``
    the refusal scores (log-odds, nats; ``None`` if not computed). ``metrics`` holds at least
    ``refusal_rate`` and ``asr`` (fractions), and ``mean_refusal_score`` when scores exist.
    ``n_empty`` counts empty completions (judged not refused, so counted in the ASR: ``evaluate``
    warns when there are any). ``provenance``: model name, weight hash, prompt set name and
    content hash, judge, settings and the intervention (:func:`describe_intervention`).
    """

    prompts: tuple[str, ...]
    completions: tuple[str, ...]
    refused: tuple[bool, ...]
    scores: tuple[float, ...] | None
    judge: str
    metrics: Mapping[str, Metric]
    provenance: Mapping[str, Any] = field(default_factory=dict)
    n_empty: int = 0

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
        ``refusal_rate_ci``, ``asr``, ``asr_ci``, ``mean_refusal_score``, ...), ``n_empty``, then
        every metric in full, the per-prompt data and the provenance."""
        out: dict[str, Any] = {"format": FORMAT, "n": self.n, "judge": self.judge}
        for name in ("refusal_rate", "asr", "mean_refusal_score"):
            metric = self.metrics.get(name)
            out[name] = None if metric is None else metric.value
            out[f"{name}_ci"] = None if metric is None else [metric.ci_low, metric.ci_high]
        out["n_empty"] = self.n_empty
        out["metrics"] = {name: m.to_dict() for name, m in self.metrics.items()}
        out["prompts"] = list(self.prompts)
        out["completions"] = list(self.completions)
        out["refused"] = list(self.refused)
        out["scores"] = None if self.scores is None else list(self.scores)
        out["provenance"] = provenance_dict(self.provenance)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalResult:
        """Rebuild from :meth:`to_dict` output.

        Raises:
            ArtifactError: the mapping is not a saved evaluation.
        """
        if data.get("format") != FORMAT:
            raise ArtifactError(f"not a safegeom evaluation (format {data.get('format')!r})")
        scores = data.get("scores")
        return cls(
            prompts=tuple(data["prompts"]),
            completions=tuple(data["completions"]),
            refused=tuple(bool(r) for r in data["refused"]),
            scores=None if scores is None else tuple(float(s) for s in scores),
            judge=str(data["judge"]),
            metrics={k: Metric.from_dict(v) for k, v in data["metrics"].items()},
            provenance=provenance_from(data.get("provenance")),
            n_empty=int(data.get("n_empty", 0)),
        )

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (:func:`~safegeom.artifacts.write_json`). Returns the path."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        """Read a file written by :meth:`save`.

        Raises:
            NotFoundError: there is no such file.
            ArtifactError: the file is not JSON or not a saved evaluation.
        """
        return cls.from_dict(read_json(path, what="safegeom evaluation"))
