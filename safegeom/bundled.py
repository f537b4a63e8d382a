"""The bundled prompt sets: which file and fields each reads, and the fixed split rule.

The split rule and the table of sets are documented in :mod:`safegeom.prompts`; this module holds
the rows and split indices as plain tuples, so :mod:`safegeom.prompts` builds its ``PromptSet``
values from them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from safegeom.artifacts import sha256_text
from safegeom.errors import NotFoundError, SafegeomError
from safegeom.prompt_records import Record, read_records, text_field

__all__ = ["BUNDLED", "BUNDLED_SPECS", "CONTEXT_SEPARATOR", "DATA_DIR", "SPLITS", "has_split"]

BUNDLED: tuple[str, ...] = (
    "advbench",
    "jbb-harmful",
    "jbb-benign",
    "xstest-safe",
    "xstest-unsafe",
    "directharm4",
    "alpaca",
    "gsm8k",
    "harmbench",
    "harmbench-contextual",
    "harmbench-train",
    "strongreject",
    "strongreject-noadvbench",
)
"""Names of the bundled prompt sets accepted by :func:`load_prompts`."""

SPLITS: tuple[str, ...] = ("train", "val", "test")
"""Split names accepted after a colon in a bundled spec (``"advbench:test"``)."""

DATA_DIR: Path = Path(__file__).resolve().parent / "data"
"""Directory of the bundled data files (shipped as package data)."""

CONTEXT_SEPARATOR = "\n\n---\n\n"
"""Between a HarmBench contextual behaviour's context and its request: the prompt is
``context + CONTEXT_SEPARATOR + behaviour``, as HarmBench's own baselines (``DirectRequest``, GCG)
join them."""


# --- bundled sets -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Bundled:
    """How to read one bundled set: file(s), fields, row filters, splits and role."""

    file: str
    prompt: str
    completion: str | None = None
    category: str | None = None
    where: tuple[str, str] | None = None  # (field, value) rows must match
    where_not: tuple[str, str] | None = None  # (field, value) rows must not match
    train_file: str | None = None  # separate train pool (gsm8k)
    split_files: tuple[tuple[str, str], ...] = ()  # upstream's own splits, each a whole file
    context: str | None = None  # field put before the prompt, joined by CONTEXT_SEPARATOR
    targets: tuple[str, str] | None = None  # (JSON file, key field): completion = JSON[row[key]]
    completion_kind: str | None = None  # what completions are: "target", "answer" or "response"
    evaluation_only: str = ""  # why no split of the set may be trained on ("": test splits only)
    missing_split: str = ""  # the fix named when a split the set lacks is asked for


_HB = "harmbench/harmbench_behaviors_text_"
_HB_SPLITS = (("val", f"{_HB}val.csv"), ("test", f"{_HB}test.csv"))
_HB_TARGETS = ("harmbench/harmbench_targets_text.json", "BehaviorID")
_HB_EVAL = (
    "HarmBench's val behaviours are for attack development and selection, its test behaviours "
    "for evaluation; train on harmbench-train"
)
_HB_NO_TRAIN = "HarmBench's training behaviours are the separate set harmbench-train"
_SR = "strongreject/strongreject_dataset.csv"
_SR_EVAL = "StrongREJECT is an evaluation benchmark with no training rows"
_SR_NO_SPLIT = "StrongREJECT is evaluation-only; every prompt is in its test split"

BUNDLED_SPECS: dict[str, _Bundled] = {
    "advbench": _Bundled(
        "advbench/harmful_behaviors.csv", "goal", completion="target", completion_kind="target"
    ),
    "jbb-harmful": _Bundled(
        "jailbreakbench/harmful-behaviors.csv",
        "Goal",
        completion="Target",
        category="Category",
        completion_kind="target",
    ),
    "jbb-benign": _Bundled(
        "jailbreakbench/benign-behaviors.csv",
        "Goal",
        completion="Target",
        category="Category",
        completion_kind="target",
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
        completion_kind="answer",
    ),
    "harmbench": _Bundled(
        f"{_HB}test.csv",
        "Behavior",
        category="SemanticCategory",
        where=("FunctionalCategory", "standard"),
        split_files=_HB_SPLITS,
        targets=_HB_TARGETS,
        completion_kind="target",
        evaluation_only=_HB_EVAL,
        missing_split=_HB_NO_TRAIN,
    ),
    "harmbench-contextual": _Bundled(
        f"{_HB}test.csv",
        "Behavior",
        category="SemanticCategory",
        where=("FunctionalCategory", "contextual"),
        split_files=_HB_SPLITS,
        context="ContextString",
        targets=_HB_TARGETS,
        completion_kind="target",
        evaluation_only=_HB_EVAL,
        missing_split=_HB_NO_TRAIN,
    ),
    "harmbench-train": _Bundled(
        "harmbench/adv_training_behaviors_safe_responses.csv",
        "Behavior",
        completion="Safe_Response",
        split_files=(("train", "harmbench/adv_training_behaviors_safe_responses.csv"),),
        completion_kind="response",
        missing_split="it is HarmBench's adversarial-training set; evaluate on harmbench:test",
    ),
    "strongreject": _Bundled(
        _SR,
        "forbidden_prompt",
        category="category",
        split_files=(("test", _SR),),
        evaluation_only=_SR_EVAL,
        missing_split=_SR_NO_SPLIT,
    ),
    "strongreject-noadvbench": _Bundled(
        _SR,
        "forbidden_prompt",
        category="category",
        where_not=("source", "AdvBench"),
        split_files=(("test", _SR),),
        evaluation_only=_SR_EVAL,
        missing_split=_SR_NO_SPLIT,
    ),
}
assert tuple(BUNDLED_SPECS) == BUNDLED


def _check_name(name: str) -> None:
    """Raise :class:`NotFoundError` unless ``name`` is a bundled set name."""
    if name not in BUNDLED:
        raise NotFoundError(
            f"unknown bundled prompt set {name!r}; known names: {', '.join(BUNDLED)}"
        )


def has_split(name: str, split: str) -> bool:
    """Whether bundled set ``name`` has ``split`` (a set kept in upstream's files may lack some)."""
    files = BUNDLED_SPECS[name].split_files
    return not files or split in dict(files)


def _check_split(name: str, split: str) -> None:
    """Raise :class:`NotFoundError` when bundled set ``name`` has no ``split``, naming the fix."""
    if not has_split(name, split):
        have = ", ".join(f"{name}:{s}" for s, _ in BUNDLED_SPECS[name].split_files)
        raise NotFoundError(
            f"{name} has no {split} split: {BUNDLED_SPECS[name].missing_split} (it has {have})"
        )


def _pool_file(name: str, split: str | None) -> str:
    """Return the data file (relative to :data:`DATA_DIR`) that ``split`` of ``name`` is drawn from."""
    spec = BUNDLED_SPECS[name]
    if spec.split_files and split is not None:
        return dict(spec.split_files)[split]
    if split == "train" and spec.train_file is not None:
        return spec.train_file
    return spec.file


@functools.cache
def _targets(rel: str) -> dict[str, str]:
    """Return the ``{key: target}`` mapping of a JSON targets file (cached)."""
    data = json.loads((DATA_DIR / rel).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise SafegeomError(f"{rel!r} must hold a JSON object of string targets")
    return data


@functools.cache
def _bundled_rows(
    name: str, rel: str | None = None
) -> tuple[tuple[str, str | None, str | None], ...]:
    """Return the (prompt, completion, category) rows of a bundled set, in file order (cached).

    ``rel`` is the data file to read (:func:`_pool_file`); by default the set's main file.
    """
    spec = BUNDLED_SPECS[name]
    rel = rel or spec.file
    # The bundled files' bytes are pinned by hash, so the quote heuristic for user files (which
    # misreads HarmBench's multi-line contexts) is not needed.
    records = read_records(DATA_DIR / rel, check_quotes=False)
    if spec.where is not None:
        key, value = spec.where
        records = tuple(r for r in records if r.get(key) == value)
    if spec.where_not is not None:
        key, value = spec.where_not
        records = tuple(r for r in records if r.get(key) != value)
    return tuple(
        (
            _prompt(spec, r, rel, i),
            _completion(spec, r, rel, i),
            text_field(r, spec.category, rel, i) if spec.category else None,
        )
        for i, r in enumerate(records)
    )


def _prompt(spec: _Bundled, record: Record, rel: str, i: int) -> str:
    """Return a row's prompt: the prompt field, after its context where the set has one."""
    prompt = text_field(record, spec.prompt, rel, i)
    if spec.context is None:
        return prompt
    return f"{text_field(record, spec.context, rel, i)}{CONTEXT_SEPARATOR}{prompt}"


def _completion(spec: _Bundled, record: Record, rel: str, i: int) -> str | None:
    """Return a row's completion: its completion field, or its target looked up by key."""
    if spec.completion is not None:
        return text_field(record, spec.completion, rel, i)
    if spec.targets is None:
        return None
    file, key_field = spec.targets
    key = text_field(record, key_field, rel, i)
    target = _targets(file).get(key)
    if target is None:
        raise SafegeomError(f"{file!r} has no target for {key_field} {key!r} ({rel!r} row {i})")
    return target


@functools.cache
def _split_indices(name: str, split: str) -> tuple[int, ...]:
    """Return the row indices of ``split`` of bundled set ``name`` (cached).

    A split kept in a file of its own (gsm8k's train, HarmBench's val and test) is that whole file
    in file order; the others follow the hash order.
    """
    spec = BUNDLED_SPECS[name]
    _check_split(name, split)
    if spec.split_files or (spec.train_file is not None and split == "train"):
        return tuple(range(len(_bundled_rows(name, _pool_file(name, split)))))
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
