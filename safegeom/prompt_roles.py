"""What a prompt set's rows are for: training data or evaluation only, and attack targets.

A bundled set's role follows from its name (``PromptSet.name``, kept by slicing, sampling and
:func:`~safegeom.prompts.combine_prompts`, which joins names with ``+``):

- **Evaluation only**, never training data: every ``:test`` split; a split-less name whose set has a
  test split (``advbench`` holds ``advbench:test``; ``gsm8k`` is GSM8K's test file); and every split
  of the evaluation benchmarks ``harmbench``, ``harmbench-contextual`` (val is for attack development
  and selection, test for evaluation; train on ``harmbench-train``), ``strongreject`` and
  ``strongreject-noadvbench``. :func:`check_trainable` refuses them; training data builders call it.
- **Attack targets**: the completions of ``advbench``, ``jbb-harmful``, ``jbb-benign``,
  ``harmbench`` and ``harmbench-contextual`` are the affirmative prefixes ("Sure, here is ...") that
  GCG-style attacks optimise toward; :func:`attack_targets` returns them. Other completions are
  reference answers (``gsm8k``) or training responses (``harmbench-train``: HarmBench's safe
  refusals, the ``responses`` a fine-tuning task reads), not targets.

User files and inline lists have no known role: they may be trained on and have no targets.

Example:
    >>> from safegeom.prompt_roles import attack_targets, evaluation_only
    >>> attack_targets("harmbench:val")[0][:10]
    'Sure, here'
    >>> evaluation_only("advbench:train") is None
    True
"""

from __future__ import annotations

from safegeom.bundled import BUNDLED, BUNDLED_SPECS, SPLITS, has_split
from safegeom.errors import SafegeomError
from safegeom.prompts import Prompts, PromptSet, load_prompts

__all__ = ["EVALUATION_ONLY", "TARGET_SETS", "attack_targets", "check_trainable", "evaluation_only"]

EVALUATION_ONLY: tuple[str, ...] = tuple(n for n in BUNDLED if BUNDLED_SPECS[n].evaluation_only)
"""Bundled sets none of whose splits may be trained on."""

TARGET_SETS: tuple[str, ...] = tuple(
    n for n in BUNDLED if BUNDLED_SPECS[n].completion_kind == "target"
)
"""Bundled sets whose completions are attack targets."""


def _parts(prompts: PromptSet) -> list[tuple[str | None, str | None]]:
    """Return ``(bundled name, split)`` for each ``+``-joined part of the set's name.

    A part that is not a bundled spec gives ``(None, None)``.
    """
    out: list[tuple[str | None, str | None]] = []
    for part in prompts.name.split("+"):
        base, sep, split = part.partition(":")
        if base in BUNDLED and (not sep or split in SPLITS):
            out.append((base, split or None))
        else:
            out.append((None, None))
    return out


def evaluation_only(prompts: Prompts) -> str | None:
    """Say why a prompt set must not be trained on, if it must not.

    Args:
        prompts: a :class:`~safegeom.prompts.PromptSet` or a spec (``"harmbench:val"``).

    Returns:
        One line naming each evaluation-only part and what to train on instead, or ``None`` when
        the set may be trained on (train splits, ``harmbench-train``, user files, inline lists).
    """
    ps = load_prompts(prompts)
    reasons: list[str] = []
    for base, split in _parts(ps):
        if base is None:
            continue
        part = base if split is None else f"{base}:{split}"
        why = BUNDLED_SPECS[base].evaluation_only
        if why:
            reasons.append(f"{part} is evaluation-only ({why})")
        elif split == "test":
            reasons.append(f"{part} is a test split (train on {base}:train)")
        elif split is None and has_split(base, "test"):
            reasons.append(f"{part} holds its test split (train on {base}:train)")
    return "; ".join(reasons) or None


def check_trainable(prompts: Prompts) -> PromptSet:
    """Return the prompt set if it may be used as training data.

    Args:
        prompts: a :class:`~safegeom.prompts.PromptSet` or a spec.

    Returns:
        The loaded :class:`~safegeom.prompts.PromptSet`.

    Raises:
        SafegeomError: the set is evaluation-only (:func:`evaluation_only`); the message names
            what to train on instead.
    """
    ps = load_prompts(prompts)
    why = evaluation_only(ps)
    if why is not None:
        raise SafegeomError(f"prompt set {ps.name!r} must not be trained on: {why}")
    return ps


def attack_targets(prompts: Prompts) -> tuple[str, ...]:
    """Return the attack target of every prompt: the affirmative prefix an attack optimises toward.

    Args:
        prompts: a :class:`~safegeom.prompts.PromptSet` or a spec from :data:`TARGET_SETS`
            (``"advbench:test"``, ``"harmbench:val"``, ``"harmbench-contextual"``), or sets of
            them joined by :func:`~safegeom.prompts.combine_prompts`.

    Returns:
        One target per prompt, aligned with ``prompts``.

    Raises:
        SafegeomError: a part of the set has no targets (a user file, ``gsm8k``'s answers,
            ``harmbench-train``'s safe responses, a set without completions).
    """
    ps = load_prompts(prompts)
    for (base, _), part in zip(_parts(ps), ps.name.split("+"), strict=True):
        kind = None if base is None else BUNDLED_SPECS[base].completion_kind
        if kind != "target":
            what = {
                None: "no completions",
                "answer": "completions that are reference answers",
                "response": "completions that are training responses",
            }[kind]
            where = "is not a bundled set" if base is None else f"has {what}"
            raise SafegeomError(
                f"no attack targets for {part!r}: it {where}; targets come with "
                f"{', '.join(TARGET_SETS)}"
            )
    if ps.completions is None:  # a PromptSet built by hand under a bundled name
        raise SafegeomError(f"no attack targets for {ps.name!r}: its completions are missing")
    return ps.completions
