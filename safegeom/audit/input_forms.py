"""The forms an audit's checkpoints come in, as ``(label, step, path)`` items: a safegeom run
folder's saved steps, or a list of folders whose names may carry their steps; labels unique in
the table (:func:`unique_labels`). :mod:`~safegeom.audit.inputs` checks the models themselves."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from safegeom.errors import ArtifactError, NotFoundError

__all__ = ["BASE_LABEL", "from_list", "from_trajectory", "safe_label", "step_of", "unique_labels"]

BASE_LABEL = "base"
"""Label of the base model (step 0) in the table."""
_STEP_NAME = re.compile(r"^(?:step|checkpoint|ckpt)[-_]?0*(\d+)$", re.IGNORECASE)


def step_of(name: str) -> int | None:
    """The step a folder name carries (``step-000040``, ``checkpoint-40`` → 40), else ``None``."""
    match = _STEP_NAME.match(name)
    return int(match.group(1)) if match else None


def safe_label(text: str) -> str:
    """``text`` as a file-name-safe label (runs of other characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._") or "checkpoint"


def from_trajectory(root: Path) -> tuple[str, list[tuple[str, int, str]], str | None]:
    """The base, checkpoints and task of a safegeom run folder.

    Returns:
        ``(base model, [(folder name, step, path)] after step 0, task or None)``.

    Raises:
        ArtifactError: the run holds no checkpoint after step 0.
        NotFoundError: a checkpoint folder its trajectory.json lists is missing.
    """
    from safegeom.training.trajectory import load_trajectory

    trajectory = load_trajectory(root)
    records = [c for c in trajectory.checkpoints if c.step > 0]
    if not records:
        raise ArtifactError(
            f"the trajectory in {root} is empty: it holds no checkpoint after step 0; train it "
            "(or resume it) first"
        )
    items = [(Path(c.path).name, c.step, str(root / c.path)) for c in records]
    for _, _, path in items:
        if not Path(path).is_dir():
            raise NotFoundError(
                f"checkpoint folder {path} (listed in {root}/trajectory.json) is missing"
            )
    task = trajectory.config.get("task")
    return trajectory.base_model, items, None if task is None else str(task)


def from_list(paths: Sequence[str]) -> list[tuple[str, int, str]]:
    """``(name, step, path)`` of checkpoints given in a list, by step: the steps their names carry
    when every name carries a distinct one, else 1, 2, ... in the order given."""
    names = [Path(p).name or p for p in paths]
    steps = [step_of(n) for n in names]
    if all(s is not None for s in steps) and len(set(steps)) == len(steps):
        numbered = list(zip(names, steps, paths, strict=True))
    else:
        numbered = [(n, i + 1, p) for i, (n, p) in enumerate(zip(names, paths, strict=True))]
    return sorted(numbered, key=lambda item: item[1])  # type: ignore[arg-type,return-value]


def unique_labels(items: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    """``items`` with each name made a safe label unique in the table (never ``base``): a
    repeated name gets its parent folder's name, then its step."""
    seen: set[str] = {BASE_LABEL}
    out = []
    for name, step, path in items:
        label = safe_label(name)
        if label in seen:
            label = safe_label(f"{Path(path).parent.name}_{name}")
        while label in seen:
            label = f"{label}_{step}"
        seen.add(label)
        out.append((label, step, path))
    return out
