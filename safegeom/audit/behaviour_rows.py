"""The behaviour family: refusal, ASR, over-refusal, refusal scores, KL to the base,
cross-entropy and task accuracy of one checkpoint.

Without generation (``generate=False``) only the numbers that need none are written:
``refusal_score`` (each held-out set), ``kl_to_base`` (harmless validation prompts) and
``cross_entropy`` (per-token cross-entropy of the reference completions of
``AuditConfig.completion_sets``, by default GSM8K's held-out answers: the bundled ``alpaca`` and
``xstest`` sets carry no completions; a utility number that needs no generation). With
generation: the judged
``refusal_rate`` of every held-out set, ``asr`` on harmful sets, ``over_refusal`` on harmless sets
(the set's judge from ``AuditConfig.behaviour_sets``) and ``task_accuracy`` (greedy, exact
match) on the task's held-out problems (the first ``n_behaviour``). Every number has a
bootstrap CI seeded by ``config.seed``.
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Any

from safegeom.audit.config import AuditConfig
from safegeom.bootstrap import Metric
from safegeom.errors import SafegeomError
from safegeom.evaluation import (
    EvaluateConfig,
    cross_entropy,
    evaluate,
    kl_to_reference,
    refusal_scores,
)
from safegeom.generation import generate
from safegeom.judges import task_accuracy
from safegeom.models.loading import LoadedModel
from safegeom.prompts import combine_prompts, load_prompts

if TYPE_CHECKING:
    from safegeom.training.tasks import Task

__all__ = ["behaviour_rows", "metric_row"]


def metric_row(metric: str, m: Metric, judge: str | None = None, **at: Any) -> dict[str, Any]:
    """One table row of a :class:`~safegeom.bootstrap.Metric`: its value, CI and count, the judge
    that made it (``None``: no judge), and the other columns ``at`` (``prompts=...`` ...)."""
    return {
        "metric": metric,
        "value": float(m.value),
        "ci_low": float(m.ci_low),
        "ci_high": float(m.ci_high),
        "n": int(m.n),
        "judge": judge,
        **at,
    }


def behaviour_rows(
    lm: LoadedModel,
    config: AuditConfig,
    *,
    base: LoadedModel,
    task: Task | None,
    generate_text: bool,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The behaviour rows of one checkpoint (see the module docstring).

    Returns:
        ``(rows, seconds)``: schema rows (carrier, source and layer null) and the wall seconds
        of ``generation`` (judged sets and task) and ``scoring`` (scores, KL, cross-entropy).
    """
    boot = {"n_resamples": config.n_resamples, "seed": config.seed}
    common = {"batch_size": config.batch_size, "system": config.system, "progress": progress}
    rows: list[dict[str, Any]] = []
    gen_s = score_s = 0.0
    for spec, (role, judge) in config.behaviour_sets.items():
        prompts = load_prompts(spec).take(config.n_behaviour)
        started = time.perf_counter()
        if generate_text:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*completions are empty")
                settings = EvaluateConfig(
                    judge=judge,
                    max_new_tokens=config.max_new_tokens,
                    batch_size=config.batch_size,
                    system=config.system,
                    **boot,
                )
                result = evaluate(lm, prompts, settings, progress=progress)
            rate = result.metrics["refusal_rate"]
            rows.append(metric_row("refusal_rate", rate, result.judge, prompts=prompts.name))
            if role == "harmful":
                rows.append(
                    metric_row("asr", result.metrics["asr"], result.judge, prompts=prompts.name)
                )
            else:
                rows.append(metric_row("over_refusal", rate, result.judge, prompts=prompts.name))
            score = result.metrics["mean_refusal_score"]
            gen_s += time.perf_counter() - started
        else:
            values = refusal_scores(lm, prompts, **common).numpy()
            score = Metric.from_values("refusal_score", values, **boot)
            score_s += time.perf_counter() - started
        rows.append(metric_row("refusal_score", score, prompts=prompts.name))
    started = time.perf_counter()
    for spec in config.completion_sets:
        prompts = load_prompts(spec).take(config.n_behaviour)
        if prompts.completions is None:
            raise SafegeomError(
                f"{prompts.name} has no reference completions; --completion-sets takes sets "
                "that do (gsm8k:test, a file with a completion column)"
            )
        ce = cross_entropy(lm, prompts, prompts.completions, boot=boot, **common)
        rows.append(metric_row("cross_entropy", ce, prompts=prompts.name))
    score_s += time.perf_counter() - started
    started = time.perf_counter()
    harmless_val = combine_prompts(config.harmless_val).take(config.n_val)
    kl = kl_to_reference(base, lm, harmless_val, boot=boot, **common)
    rows.append(metric_row("kl_to_base", kl, prompts=harmless_val.name))
    score_s += time.perf_counter() - started
    if generate_text and task is not None and task.eval_prompts:
        started = time.perf_counter()
        problems = list(task.eval_prompts[: config.n_behaviour])
        references = list(task.eval_references[: config.n_behaviour])  # type: ignore[index]
        answers = generate(lm, problems, max_new_tokens=config.max_new_tokens, **common)
        acc = task_accuracy(answers, references, **boot)
        rows.append(metric_row("task_accuracy", acc, acc.judge, prompts=f"{task.name}:eval"))
        gen_s += time.perf_counter() - started
    return rows, {"generation": gen_s, "scoring": score_s}
