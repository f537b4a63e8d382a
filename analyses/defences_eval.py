"""One checkpoint's held-out numbers for the defence study (:mod:`analyses.defences`), cached.

Per checkpoint, greedy decoding throughout:

- ASR: substring judge, 24 new tokens, on ``advbench:test`` (104), ``jbb-harmful:test`` (20) and
  ``directharm4:test`` (80) combined (204 prompts);
- over-refusal: ``alpaca:test`` (a fixed sample of 100, seed 0; substring judge) and
  ``xstest-safe:test`` (50; the XSTest judge), 24 new tokens, 150 prompts;
- task accuracy: exact match of 8 new tokens on the task's 200 held-out problems (as
  ``analyses/benign_task.py``; none for ``harmful``);
- KL to the base: KL(base ‖ checkpoint) of the next-token distribution at the first answer
  position of the 100 Alpaca prompts, nats (:func:`safegeom.evaluation.kl_divergence`).

Every number keeps its per-prompt values (1/0 judgements, hits, KL), so the study can form CIs
across prompts and seeds. The judged sets are saved as :class:`~safegeom.eval_result.EvalResult`
files beside ``metrics.json`` in the checkpoint's eval folder; a folder that holds
``metrics.json`` is read back instead of measured again.
"""

from __future__ import annotations

import warnings
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

__all__ = ["HARMFUL_TEST", "MAX_NEW_TOKENS", "N_ALPACA", "evaluate_checkpoint", "harmless_sets"]

HARMFUL_TEST: tuple[str, ...] = ("advbench:test", "jbb-harmful:test", "directharm4:test")
"""Held-out harmful sets of the ASR, combined in this order."""
N_ALPACA = 100
"""Alpaca held-out prompts (sample seed 0) for over-refusal and KL to the base."""
MAX_NEW_TOKENS = 24
"""Tokens generated per judged prompt."""
TASK_TOKENS = 8
"""Tokens generated per task problem (the answers are one or two words)."""


@cache
def harmful_set() -> PromptSet:
    """The combined held-out harmful prompts (204)."""
    return combine_prompts(list(HARMFUL_TEST))


@cache
def harmless_sets() -> tuple[tuple[PromptSet, str], ...]:
    """The over-refusal sets with their judges: (Alpaca sample, substring), (XSTest-safe, xstest)."""
    alpaca = load_prompts("alpaca:test").sample(N_ALPACA, seed=0)
    return ((alpaca, "substring"), (load_prompts("xstest-safe:test"), "xstest"))


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
    path: str | Path, task: Task, base: LoadedModel, folder: Path
) -> dict[str, Any]:
    """The held-out numbers of the checkpoint at ``path`` (module docstring), cached in ``folder``.

    Args:
        path: the checkpoint (anything :func:`safegeom.models.load_model` reads).
        task: the run's task (its held-out problems give the task accuracy).
        base: the base model (the KL reference).
        folder: this checkpoint's eval folder (created).

    Returns:
        ``{"asr", "over_refusal", "task_accuracy", "kl"}``: per-prompt lists (1/0 attack successes,
        1/0 refusals, 1/0 hits or ``None``, KL in nats), plus ``"rates"``: the mean of each and
        the ASR per harmful set and the over-refusal per harmless set (fractions).
    """
    file = folder / "metrics.json"
    if file.is_file():
        return read_json(file, what="defence-study checkpoint metrics")
    folder.mkdir(parents=True, exist_ok=True)
    lm = base if str(path) == "tiny-chat" else load_model(path)
    refused = _judged(lm, harmful_set(), "substring", folder / "harmful.json")
    asr = [1.0 - r for r in refused]
    over: list[float] = []
    rates: dict[str, float] = {}
    start = 0
    for spec in HARMFUL_TEST:
        n = len(load_prompts(spec))
        rates[f"asr:{spec}"] = sum(asr[start : start + n]) / n
        start += n
    for prompts, judge in harmless_sets():
        part = _judged(lm, prompts, judge, folder / f"harmless-{judge}.json")
        rates[f"over_refusal:{prompts.name}"] = sum(part) / len(part)
        over += part
    hits: list[float] | None = None
    if task.eval_prompts is not None and task.eval_references is not None:
        outs = generate(lm, list(task.eval_prompts), max_new_tokens=TASK_TOKENS, progress=False)
        hits = [float(h) for h in exact_match(outs, task.eval_references)]
    alpaca = harmless_sets()[0][0]
    kl = [float(v) for v in kl_divergence(base, lm, alpaca, progress=False).tolist()]
    out: dict[str, Any] = {"asr": asr, "over_refusal": over, "task_accuracy": hits, "kl": kl}
    for name in ("asr", "over_refusal", "task_accuracy", "kl"):
        values = out[name]
        rates[name] = None if values is None else sum(values) / len(values)
    out["rates"] = rates
    write_json(file, out)
    return out
