"""Pure parts of the defence study (:mod:`analyses.defences`): the learning-rate rule, CIs over
seeds and prompts, the methods × tasks table and its markdown.

Nothing here trains or loads a model; every function maps plain numbers to plain numbers, so the
tests exercise them on small synthetic inputs.

Interval across seeds and prompts (:func:`seed_prompt_ci`): the point is the mean over seeds of
each seed's per-prompt mean; the 95% interval is a two-level percentile bootstrap, resampling the
seeds with replacement and then, within each drawn seed, its prompts with replacement (so both the
seed-to-seed and the prompt-to-prompt variation widen it). One seed: a prompt bootstrap alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "METRICS",
    "markdown_table",
    "pick_lr",
    "seed_prompt_ci",
    "summarise",
    "table_rows",
]

METRICS: dict[str, str] = {
    "asr": "ASR",
    "over_refusal": "over-refusal",
    "task_accuracy": "task acc.",
    "kl": "KL to base (nats)",
}
"""Per-run metrics of the table (key → column heading), in column order. ``asr``,
``over_refusal`` and ``task_accuracy`` are fractions; ``kl`` is in nats."""


def pick_lr(grid: Mapping[float, float | None]) -> float:
    """The learning-rate search rule: the lr with the best held-out task accuracy, ties (equal
    to 1e-9) to the larger lr.

    Args:
        grid: lr → held-out task accuracy at the last step (a fraction; ``None`` or NaN = the run
            failed, never picked).

    Returns:
        The chosen lr.

    Raises:
        ValueError: the grid is empty or no lr has an accuracy.
    """
    scored = {lr: acc for lr, acc in grid.items() if acc is not None and not math.isnan(acc)}
    if not scored:
        raise ValueError(f"no learning rate of the grid {sorted(grid)} has a task accuracy")
    best = max(scored.values())
    return max(lr for lr, acc in scored.items() if acc >= best - 1e-9)


def seed_prompt_ci(
    per_seed: Sequence[Sequence[float]],
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean over seeds of the per-prompt means, with a two-level bootstrap interval (module
    docstring).

    Args:
        per_seed: one sequence of per-prompt values per seed (e.g. 1.0/0.0 judgements, or KL in
            nats); seeds may have different prompt counts, none may be empty.
        n_resamples: bootstrap resamples.
        confidence: coverage, in (0, 1).
        seed: seed of numpy's ``default_rng``.

    Returns:
        ``{"value", "ci": [low, high], "n_seeds", "n_prompts", "per_seed": [means]}`` in the
        units of the values.

    Raises:
        ValueError: no seeds, an empty seed, or ``confidence`` outside (0, 1).
    """
    if not per_seed:
        raise ValueError("seed_prompt_ci needs at least one seed of values, got none")
    arrays = [np.asarray(v, dtype=np.float64) for v in per_seed]
    if any(a.size == 0 for a in arrays):
        raise ValueError("seed_prompt_ci: a seed has no per-prompt values")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    means = np.array([a.mean() for a in arrays])
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    k = len(arrays)
    for b in range(n_resamples):
        drawn = rng.integers(0, k, size=k) if k > 1 else np.zeros(1, dtype=int)
        stats[b] = np.mean(
            [arrays[i][rng.integers(0, arrays[i].size, arrays[i].size)].mean() for i in drawn]
        )
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return {
        "value": float(means.mean()),
        "ci": [float(low), float(high)],
        "n_seeds": k,
        "n_prompts": int(sum(a.size for a in arrays)),
        "per_seed": [float(m) for m in means],
    }


def summarise(
    runs: Sequence[Mapping[str, Sequence[float] | None]], **boot: Any
) -> dict[str, dict[str, Any] | None]:
    """Every :data:`METRICS` entry over the seeds of one method and task.

    Args:
        runs: one mapping per seed: metric → per-prompt values (``None``: not measured, e.g. the
            task accuracy of ``harmful``, which has no held-out problems).
        boot: passed to :func:`seed_prompt_ci`.

    Returns:
        metric → :func:`seed_prompt_ci` result, or ``None`` where no seed measured it.
    """
    out: dict[str, dict[str, Any] | None] = {}
    for metric in METRICS:
        values = [r[metric] for r in runs if r.get(metric) is not None]
        out[metric] = seed_prompt_ci(values, **boot) if values else None  # type: ignore[arg-type]
    return out


def table_rows(
    cells: Mapping[tuple[str, str], Mapping[str, Mapping[str, Any] | None]],
    methods: Sequence[str],
    tasks: Sequence[str],
) -> list[dict[str, Any]]:
    """The methods × tasks table as rows (method-major, in the given orders; missing cells are
    skipped).

    Args:
        cells: ``(method, task)`` → :func:`summarise` output.
        methods: row order of the methods.
        tasks: order of the tasks within a method.

    Returns:
        One dict per present cell: ``method``, ``task`` and per metric ``{value, ci}`` or None.
    """
    rows = []
    for method in methods:
        for task in tasks:
            cell = cells.get((method, task))
            if cell is None:
                continue
            rows.append({"method": method, "task": task, **{m: cell.get(m) for m in METRICS}})
    return rows


def _fmt(stat: Mapping[str, Any] | None, digits: int) -> str:
    if stat is None:
        return "–"
    low, high = stat["ci"]
    return f"{stat['value']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    *,
    base: Mapping[str, Any] | None = None,
    model: str = "tiny-chat",
) -> str:
    """A markdown table of :func:`table_rows` output (fractions to 3 decimals, KL to 4), with
    the base model (named ``model``) as the first row when ``base`` (metric → ``{value, ci}``) is
    given.

    Returns:
        The table text, one line per row, ending in a newline.
    """
    head = ["method", "task", *METRICS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    every = ([{"method": f"base ({model})", "task": "–", **base}] if base else []) + list(rows)
    for row in every:
        cells = [str(row["method"]), str(row["task"])]
        cells += [_fmt(row.get(m), 4 if m == "kl" else 3) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
