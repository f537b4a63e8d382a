"""One checkpoint's held-out numbers for the defence study (:mod:`analyses.defences`), cached.

Per checkpoint, greedy decoding throughout (the sizes are :class:`EvalSizes`; the defaults,
tiny-chat's, are given here):

- ASR: substring judge, 24 new tokens, on ``advbench:test`` (104), ``jbb-harmful:test`` (20) and
  ``directharm4:test`` (80) combined (204 prompts);
- over-refusal: ``alpaca:test`` (a fixed sample of 100, seed 0; substring judge) and
  ``xstest-safe:test`` (50; the XSTest judge), 24 new tokens, 150 prompts;
- task accuracy: exact match of 8 new tokens on the task's 200 held-out problems (as
  ``analyses/benign_task.py``; none for ``harmful``);
- KL to the base: KL(base ‖ checkpoint) of the next-token distribution at the first answer
  position of the Alpaca prompts, nats (:func:`safegeom.evaluation.kl_divergence`).

Every number keeps its per-prompt values (1/0 judgements, hits, KL), so the study can form CIs
across prompts and seeds. The judged sets are saved as :class:`~safegeom.eval_result.EvalResult`
files beside ``metrics.json`` in the checkpoint's eval folder; a folder that holds
``metrics.json`` is read back instead of measured again.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from safegeom.artifacts import read_json, write_json
from safegeom.evaluation import EvaluateConfig, evaluate, kl_divergence
from safegeom.generation import generate
from safegeom.models import load_model
from safegeom.models.loading import LoadedModel
from safegeom.prompts import PromptSet, combine_prompts, load_prompts
from safegeom.task_scoring import exact_match
from safegeom.training import Task

__all__ = [
    "HARMFUL_TEST",
    "MAX_NEW_TOKENS",
    "EvalSizes",
    "evaluate_checkpoint",
    "harmful_sets",
    "harmless_sets",
]

HARMFUL_TEST: tuple[str, ...] = ("advbench:test", "jbb-harmful:test", "directharm4:test")
"""Held-out harmful sets of the ASR, combined in this order."""
MAX_NEW_TOKENS = 24
"""Tokens generated per judged prompt."""
TASK_TOKENS = 8
"""Tokens generated per task problem (the answers are one or two words)."""


@dataclass(frozen=True)
class EvalSizes:
    """How many held-out prompts a checkpoint is judged on (the defaults: tiny-chat's study).

    A smaller size takes a fixed sample (seed 0) of the split, the same at every checkpoint.
    """

    n_harmful: int | None = None
    """Prompts per harmful set of :data:`HARMFUL_TEST` (None: the whole split)."""
    n_alpaca: int = 100
    """Alpaca held-out prompts for over-refusal and KL to the base."""
    n_xstest: int | None = None
    """XSTest-safe prompts (None: all 50)."""
    n_task: int | None = None
    """The task's held-out problems (None: all 200)."""


def _sample(spec: str, n: int | None) -> PromptSet:
    prompts = load_prompts(spec)
    return prompts if n is None or n >= len(prompts) else prompts.sample(n, seed=0)


@cache
def harmful_sets(sizes: EvalSizes = EvalSizes()) -> tuple[PromptSet, ...]:
    """The held-out harmful sets of the ASR, in :data:`HARMFUL_TEST` order (204 prompts by
    default)."""
    return tuple(_sample(spec, sizes.n_harmful) for spec in HARMFUL_TEST)


@cache
def harmless_sets(sizes: EvalSizes = EvalSizes()) -> tuple[tuple[PromptSet, str], ...]:
    """The over-refusal sets with their judges: (Alpaca sample, substring), (XSTest-safe, xstest)."""
    alpaca = load_prompts("alpaca:test").sample(sizes.n_alpaca, seed=0)
    return ((alpaca, "substring"), (_sample("xstest-safe:test", sizes.n_xstest), "xstest"))


def _judged(lm: LoadedModel, prompts: PromptSet, judge: str, file: Path) -> list[float]:
    """Evaluate, save the :class:`EvalResult` to ``file``; return the per-prompt refusals (1/0)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*completions are empty")
        result = evaluate(
            lm,
            prompts,
            EvaluateConfig(judge=judge, max_new_tokens=MAX_NEW_TOKENS, score=False),
            progress=False,
        )
    result.save(file)
    return [float(r) for r in result.refused]


def evaluate_checkpoint(
    path: str | Path,
    task: Task,
    base: LoadedModel,
    folder: Path,
    sizes: EvalSizes = EvalSizes(),
) -> dict[str, Any]:
    """The held-out numbers of the checkpoint at ``path`` (module docstring), cached in ``folder``.

    Args:
        path: the checkpoint (anything :func:`safegeom.models.load_model` reads); ``base.name``
            is the base itself (not loaded again).
        task: the run's task (its held-out problems give the task accuracy).
        base: the base model (the KL reference).
        folder: this checkpoint's eval folder (created).
        sizes: how many held-out prompts of each kind.

    Returns:
        ``{"asr", "over_refusal", "task_accuracy", "kl"}``: per-prompt lists (1/0 attack successes,
        1/0 refusals, 1/0 hits or ``None``, KL in nats), plus ``"rates"``: the mean of each and
        the ASR per harmful set and the over-refusal per harmless set (fractions).
    """
    file = folder / "metrics.json"
    if file.is_file():
        return read_json(file, what="defence-study checkpoint metrics")
    folder.mkdir(parents=True, exist_ok=True)
    lm = base if str(path) == base.name else load_model(path)
    parts = harmful_sets(sizes)
    refused = _judged(lm, combine_prompts(list(parts)), "substring", folder / "harmful.json")
    asr = [1.0 - r for r in refused]
    over: list[float] = []
    rates: dict[str, float] = {}
    start = 0
    for spec, part in zip(HARMFUL_TEST, parts, strict=True):
        rates[f"asr:{spec}"] = sum(asr[start : start + len(part)]) / len(part)
        start += len(part)
    for prompts, judge in harmless_sets(sizes):
        part = _judged(lm, prompts, judge, folder / f"harmless-{judge}.json")
        rates[f"over_refusal:{prompts.name}"] = sum(part) / len(part)
        over += part
    hits: list[float] | None = None
    if task.eval_prompts is not None and task.eval_references is not None:
        n = len(task.eval_prompts) if sizes.n_task is None else sizes.n_task
        prompts, references = list(task.eval_prompts)[:n], list(task.eval_references)[:n]
        outs = generate(lm, prompts, max_new_tokens=TASK_TOKENS, progress=False)
        hits = [float(h) for h in exact_match(outs, references)]
    alpaca = harmless_sets(sizes)[0][0]
    kl = [float(v) for v in kl_divergence(base, lm, alpaca, progress=False).tolist()]
    out: dict[str, Any] = {"asr": asr, "over_refusal": over, "task_accuracy": hits, "kl": kl}
    for name in ("asr", "over_refusal", "task_accuracy", "kl"):
        values = out[name]
        rates[name] = None if values is None else sum(values) / len(values)
    out["rates"] = rates
    write_json(file, out)
    return out
