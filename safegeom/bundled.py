"""The bundled prompt sets: which file and fields each reads, and the fixed split rule.

The split rule and the table of sets are documented in :mod:`safegeom.prompts`; this module holds
the rows and split indices as plain tuples, so :mod:`safegeom.prompts` builds its ``PromptSet``
values from them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from safegeom.artifacts import sha256_text
from safegeom.errors import NotFoundError
from safegeom.records import read_records, text_field

__all__ = ["BUNDLED", "DATA_DIR", "SPLITS"]

BUNDLED: tuple[str, ...] = (
    "advbench",
    "jbb-harmful",
    "jbb-benign",
    "xstest-safe",
    "xstest-unsafe",
    "directharm4",
    "alpaca",
    "gsm8k",
)
"""Names of the bundled prompt sets accepted by :func:`load_prompts`."""

SPLITS: tuple[str, ...] = ("train", "val", "test")
"""Split names accepted after a colon in a bundled spec (``"advbench:test"``)."""

DATA_DIR: Path = Path(__file__).resolve().parent / "data"
"""Directory of the bundled data files (shipped as package data)."""


# --- bundled sets -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Bundled:
    """How to read one bundled set: file(s), fields and an optional row filter."""

    file: str
    prompt: str
    completion: str | None = None
    category: str | None = None
    where: tuple[str, str] | None = None  # (field, value) rows must match
    train_file: str | None = None  # separate train pool (gsm8k)


_BUNDLED_SPECS: dict[str, _Bundled] = {
    "advbench": _Bundled("advbench/harmful_behaviors.csv", "goal", completion="target"),
    "jbb-harmful": _Bundled(
        "jailbreakbench/harmful-behaviors.csv", "Goal", completion="Target", category="Category"
    ),
    "jbb-benign": _Bundled(
        "jailbreakbench/benign-behaviors.csv", "Goal", completion="Target", category="Category"
    ),
    "xstest-safe": _Bundled(
        "xstest/xstest_prompts.csv", "prompt", category="type", where=("label", "safe")
    ),
    "xstest-unsafe": _Bundled(
        "xstest/xstest_prompts.csv", "prompt", category="type", where=("label", "unsafe")
    ),
    "directharm4": _Bundled("directharm4/directharm4.jsonl", "instruction", category="category"),
    "alpaca": _Bundled("alpaca/alpaca.json", "instruction"),
    "gsm8k": _Bundled(
        "gsm8k/test.jsonl",
        "question",
        completion="answer",
        train_file="gsm8k/train_first1000.jsonl",
    ),
}
assert tuple(_BUNDLED_SPECS) == BUNDLED


def _check_name(name: str) -> None:
    """Raise :class:`NotFoundError` unless ``name`` is a bundled set name."""
    if name not in BUNDLED:
        raise NotFoundError(
            f"unknown bundled prompt set {name!r}; known names: {', '.join(BUNDLED)}"
        )


@functools.cache
def _bundled_rows(name: str, train: bool = False) -> tuple[tuple[str, str | None, str | None], ...]:
    """Return the (prompt, completion, category) rows of a bundled set, in file order (cached)."""
    spec = _BUNDLED_SPECS[name]
    rel = spec.train_file if train and spec.train_file else spec.file
    records = read_records(DATA_DIR / rel)
    if spec.where is not None:
        key, value = spec.where
        records = tuple(r for r in records if r.get(key) == value)
    return tuple(
        (
            text_field(r, spec.prompt, rel, i),
            text_field(r, spec.completion, rel, i) if spec.completion else None,
            text_field(r, spec.category, rel, i) if spec.category else None,
        )
        for i, r in enumerate(records)
    )


@functools.cache
def _split_indices(name: str, split: str) -> tuple[int, ...]:
    """Return the row indices of ``split`` of bundled set ``name``, in hash order (cached)."""
    spec = _BUNDLED_SPECS[name]
    if spec.train_file is not None and split == "train":
        return tuple(range(len(_bundled_rows(name, train=True))))
    rows = _bundled_rows(name)
    order = sorted(range(len(rows)), key=lambda i: (sha256_text(f"{name}\x00{rows[i][0]}"), i))
    n = len(order)
    if spec.train_file is not None:  # pool is val + test only: half each
        bounds = {"val": (0, n // 2), "test": (n // 2, n)}
    else:
        n_train, n_val = n * 3 // 5, n // 5
        bounds = {
            "train": (0, n_train),
            "val": (n_train, n_train + n_val),
            "test": (n_train + n_val, n),
        }
    lo, hi = bounds[split]
    return tuple(order[lo:hi])
