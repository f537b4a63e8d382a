"""Behaviours and their attack targets from a prompt spec.

Bundled sets with targets (AdvBench's ``target`` column, HarmBench's
``harmbench_targets_text.json``, JailbreakBench's ``Target``) give them through
:func:`safegeom.prompt_roles.attack_targets`; a user file names its target column.

Example:
    >>> prompts, targets = behaviours_and_targets("harmbench:val", limit=2)
    >>> len(targets)
    2
"""

from __future__ import annotations

from safegeom.errors import SafegeomError
from safegeom.prompt_roles import attack_targets
from safegeom.prompts import Prompts, PromptSet, load_prompts

__all__ = ["behaviours_and_targets"]


def behaviours_and_targets(
    spec: Prompts,
    *,
    column: str | None = None,
    target_column: str | None = None,
    limit: int | None = None,
) -> tuple[PromptSet, tuple[str, ...]]:
    """The behaviours of ``spec`` and one target each.

    Args:
        column: the behaviour column of a user file.
        target_column: the target column of a user file (bundled sets bring their own).
        limit: keep the first ``limit`` behaviours.

    Returns:
        ``(prompt set, targets)``, aligned.

    Raises:
        SafegeomError: an empty set, or a set without targets and no ``target_column``.
    """
    if target_column is not None:
        prompts = load_prompts(spec, column=column, completion_column=target_column, n=limit)
        if prompts.completions is None:
            raise SafegeomError(
                f"{prompts.name!r} has no column {target_column!r}; name the target column"
            )
        return prompts, prompts.completions
    prompts = load_prompts(spec, column=column, n=limit)
    return prompts, attack_targets(prompts)
