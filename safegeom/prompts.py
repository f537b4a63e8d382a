"""Prompt sets: bundled datasets by name, user CSV/JSON/JSONL files, deterministic splits.

Everything downstream (capture, carriers, evaluation, training) takes a :class:`PromptSet`, a frozen,
hashable value holding the instruction texts and, where the data has them, aligned reference
completions and categories. :func:`load_prompts` turns a *spec* into one:

- a bundled name, optionally with a split: ``"advbench"``, ``"advbench:test"``, ``"gsm8k:train"``;
- a path to a user ``.csv``, ``.json`` or ``.jsonl`` file (``column=``, ``--column``, picks the prompt field);
- a list of strings (named ``"inline"``) or an existing :class:`PromptSet` (returned unchanged).

Bundled sets (files under ``safegeom/data/``, see its README for provenance and licences):

=======================  ==================================================  ================  ==============  ================
name                     file                                                prompt            completion      category
=======================  ==================================================  ================  ==============  ================
advbench                 advbench/harmful_behaviors.csv                      goal              target          --
jbb-harmful              jailbreakbench/harmful-behaviors.csv                Goal              Target          Category
jbb-benign               jailbreakbench/benign-behaviors.csv                 Goal              Target          Category
xstest-safe              xstest/xstest_prompts.csv, label=safe               prompt            --              type
xstest-unsafe            xstest/xstest_prompts.csv, label=unsafe             prompt            --              type
directharm4              directharm4/directharm4.jsonl                       instruction       --              category
alpaca                   alpaca/alpaca.json                                  instruction       --              --
gsm8k                    gsm8k/test.jsonl (train: train_first1000)           question          answer          --
harmbench                harmbench/harmbench_behaviors_text_{test,val}.csv,  Behavior          target (JSON)   SemanticCategory
                         FunctionalCategory=standard
harmbench-contextual     the same, FunctionalCategory=contextual             context, Behavior target (JSON)   SemanticCategory
harmbench-train          harmbench/adv_training_behaviors_safe_responses     Behavior          Safe_Response   --
strongreject             strongreject/strongreject_dataset.csv               forbidden_prompt  --              category
strongreject-noadvbench  the same, without its rows of source=AdvBench       forbidden_prompt  --              category
=======================  ==================================================  ================  ==============  ================

Texts are returned exactly as stored in the files (no stripping or normalisation). HarmBench's
targets (``harmbench_targets_text.json``, keyed by ``BehaviorID``) are the completions of
``harmbench`` and ``harmbench-contextual``, as AdvBench's ``target`` column is advbench's;
:func:`safegeom.prompt_roles.attack_targets` returns them. A contextual prompt is the context,
:data:`~safegeom.bundled.CONTEXT_SEPARATOR` (a blank line, ``---``, a blank line) and the request,
as HarmBench's own baselines join them. HarmBench's ``copyright`` rows are never loaded: upstream
judges them by a hash of the generated text, not by refusal. Which sets may be trained on:
:func:`safegeom.prompt_roles.check_trainable`.

Split rule (fixed; changing it would silently change every published number):

1. The pool is the whole bundled set in file order.
2. Items are ordered by ``sha256(f"{name}\\x00{text}".encode("utf-8")).hexdigest()`` (ties, which the
   bundled data does not have, broken by file position), where ``name`` is the bundled name, e.g.
   ``"xstest-safe"``.
3. With ``n`` items: train is the first ``floor(0.6 n)``, val the next ``floor(0.2 n)``, test the rest.
   Within each split the items keep that hash order.

This uses only ``hashlib``, so it does not depend on numpy, ``random`` or Python versions.
``gsm8k`` is the exception: its ``train`` split is the whole of ``train_first1000.jsonl`` (the first
1,000 GSM8K training problems, file order), and its ``val``/``test`` splits divide the 1,319-problem
GSM8K test file by the same hash order, half each (``val = floor(n / 2)``, test the rest). GSM8K's own
train/test separation is thus kept. The split-less name ``gsm8k`` is the full test file.

Sets that upstream ships already separated keep upstream's separation and have only its splits,
each a whole file in file order: ``harmbench`` and ``harmbench-contextual`` have ``val`` and ``test``
(HarmBench's val and test files; the split-less name is test), ``harmbench-train`` only ``train``
(HarmBench's adversarial-training file), ``strongreject`` and ``strongreject-noadvbench`` only
``test`` (the whole benchmark: it has no training rows, and its published numbers use every
prompt). Asking for a split a set lacks is an error that names the set to use instead.

A split-less name returns the whole set in file order. The resulting sizes (:func:`split_counts`;
0 where a set has no such split):

=======================  =====  =====  ====  ====
name                     whole  train  val   test
=======================  =====  =====  ====  ====
advbench                   520    312   104   104
jbb-harmful                100     60    20    20
jbb-benign                 100     60    20    20
xstest-safe                250    150    50    50
xstest-unsafe              200    120    40    40
directharm4                400    240    80    80
alpaca                   31323  18793  6264  6266
gsm8k                     1319   1000   659   660
harmbench                  159      0    41   159
harmbench-contextual        81      0    19    81
harmbench-train            100    100     0     0
strongreject               313      0     0   313
strongreject-noadvbench    288      0     0   288
=======================  =====  =====  ====  ====
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from safegeom.artifacts import sha256_text
from safegeom.bundled import (
    BUNDLED,
    BUNDLED_SPECS,
    DATA_DIR,
    SPLITS,
    _bundled_rows,
    _check_name,
    _check_split,
    _pool_file,
    _split_indices,
    has_split,
)
from safegeom.errors import NotFoundError, SafegeomError
from safegeom.prompt_records import (
    SUFFIXES,
    column_names,
    find_column,
    read_records_cached,
    text_field,
)

__all__ = [
    "BUNDLED",
    "DATA_DIR",
    "SPLITS",
    "PromptSet",
    "Prompts",
    "load_prompts",
    "split_counts",
]

DEFAULT_COLUMNS: tuple[str, ...] = ("prompt", "instruction", "goal", "question")
"""Prompt fields tried, in order and case-insensitively, when a user file is loaded without ``column``."""


# A parsed record: column name -> value (None where a JSON field is null).


@dataclass(frozen=True)
class PromptSet:
    """An ordered, immutable set of prompts with optional aligned completions and categories.

    Attributes:
        name: Human-readable identifier, e.g. ``"advbench:train"`` or a file path.
        prompts: The instruction texts.
        completions: Reference responses aligned with ``prompts`` where the data has them
            (AdvBench/JBB ``target``, GSM8K ``answer``), else ``None``.
        categories: Per-prompt categories where the data has them (JBB ``Category``, DirectHarm4
            ``category``, XSTest ``type``), else ``None``.
        source: Where the prompts came from: ``safegeom/data/<file>`` for bundled sets, else the
            user path or ``"inline"``.
        split: ``"train"``, ``"val"``, ``"test"`` or ``None`` for a whole set.
    """

    name: str
    prompts: tuple[str, ...]
    completions: tuple[str, ...] | None = None
    categories: tuple[str, ...] | None = None
    source: str = ""
    split: str | None = None

    def __post_init__(self) -> None:
        """Coerce sequences to tuples and check that aligned fields have matching lengths."""
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not all(isinstance(p, str) for p in self.prompts):
            raise SafegeomError(f"prompt set {self.name!r}: every prompt must be a str")
        for field in ("completions", "categories"):
            values = getattr(self, field)
            if values is None:
                continue
            values = tuple(values)
            object.__setattr__(self, field, values)
            if len(values) != len(self.prompts):
                raise SafegeomError(
                    f"prompt set {self.name!r}: {len(values)} {field} for "
                    f"{len(self.prompts)} prompts; they must be aligned"
                )
        if self.split is not None and self.split not in SPLITS:
            raise SafegeomError(f"unknown split {self.split!r}; use one of {', '.join(SPLITS)}")

    def __len__(self) -> int:
        """Return the number of prompts."""
        return len(self.prompts)

    def __iter__(self) -> Iterator[str]:
        """Iterate over the prompt texts."""
        return iter(self.prompts)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> PromptSet: ...

    def __getitem__(self, i: int | slice) -> str | PromptSet:
        """Return the prompt at index ``i``, or a :class:`PromptSet` for a slice (fields aligned)."""
        if isinstance(i, slice):
            return self.select(range(len(self))[i])
        return self.prompts[i]

    @property
    def content_hash(self) -> str:
        """Return a sha256 hex digest of the prompts (and completions, if present).

        The hash is order-sensitive and independent of ``name``, ``source``, ``split`` and
        ``categories``; it changes whenever any prompt or completion text changes.
        """
        h = hashlib.sha256(b"safegeom.PromptSet.v1\x00")
        _hash_texts(h, b"prompts", self.prompts)
        if self.completions is not None:
            _hash_texts(h, b"completions", self.completions)
        return h.hexdigest()

    def take(self, n: int) -> PromptSet:
        """Return a :class:`PromptSet` of the first ``n`` prompts (all of them if fewer)."""
        if n < 0:
            raise SafegeomError(f"take(n) needs n >= 0, got {n}")
        return self.select(range(min(n, len(self))))

    def sample(self, n: int, seed: int = 0) -> PromptSet:
        """Return a deterministic sample of ``n`` prompts, kept in their original order.

        Items are ranked by ``sha256(f"{seed}\\x00{index}\\x00{text}")`` and the first ``n`` kept, so
        the result depends only on ``seed`` and the content, never on numpy or ``random``.
        """
        if not 0 <= n <= len(self):
            raise SafegeomError(
                f"sample(n) needs 0 <= n <= {len(self)} (size of {self.name!r}), got {n}"
            )
        ranked = sorted(
            range(len(self)), key=lambda i: sha256_text(f"{seed}\x00{i}\x00{self.prompts[i]}")
        )
        return self.select(sorted(ranked[:n]))

    def select(self, indices: Sequence[int]) -> PromptSet:
        """Return a copy holding only ``indices`` (in that order), with aligned fields kept."""
        return PromptSet(
            name=self.name,
            prompts=tuple(self.prompts[i] for i in indices),
            completions=_pick(self.completions, indices),
            categories=_pick(self.categories, indices),
            source=self.source,
            split=self.split,
        )


Prompts = PromptSet | Sequence[str] | str
"""What every function that takes a prompt set accepts: a :class:`PromptSet`, a list of
instructions, or a spec (a bundled set name with an optional split, or a file path)."""


def combine_prompts(specs: Sequence[Prompts], *, n_each: int | None = None) -> PromptSet:
    """Several prompt sets as one, in order, named ``"a+b+c"``.

    Args:
        specs: prompt sets or specs (``("advbench:train", "jbb-harmful:train")``).
        n_each: keep the first ``n_each`` prompts of each set (all when ``None``).

    Returns:
        A :class:`PromptSet`; completions and categories are kept only when every set has them.

    Raises:
        SafegeomError: no set is given, or one of them is empty or unknown.

    Example:
        >>> combine_prompts(["advbench:train", "jbb-harmful:train"], n_each=2).name
        'advbench:train+jbb-harmful:train'
    """
    if len(specs) == 0:
        raise SafegeomError("no prompt set to combine: name at least one")
    sets = [load_prompts(s) for s in specs]
    if n_each is not None:
        sets = [s.take(n_each) for s in sets]
    if len(sets) == 1:
        return sets[0]

    def joined(field: str) -> tuple[str, ...] | None:
        values = [getattr(s, field) for s in sets]
        return None if any(v is None for v in values) else tuple(x for v in values for x in v)

    return PromptSet(
        name="+".join(s.name for s in sets),
        prompts=tuple(p for s in sets for p in s.prompts),
        completions=joined("completions"),
        categories=joined("categories"),
        source="+".join(s.source for s in sets),
    )


def load_prompts(
    spec: Prompts,
    *,
    column: str | None = None,
    completion_column: str | None = None,
    n: int | None = None,
) -> PromptSet:
    """Load a prompt set from a bundled name, a file path, a list of strings or a PromptSet.

    Args:
        spec: A bundled name (see :data:`BUNDLED`) with an optional ``:train``/``:val``/``:test``
            split; a path to a ``.csv``, ``.json`` (array of objects or strings) or ``.jsonl`` file;
            a sequence of strings (named ``"inline"``); a :class:`PromptSet` (passed through); or
            an object with ``as_prompt_set()`` (a :class:`~safegeom.attacks.AttackSet`).
        column: For files, the prompt field (case-insensitive). Default: the first of ``prompt``,
            ``instruction``, ``goal``, ``question`` present.
        completion_column: For files, an optional field of reference completions.
        n: If given, keep only the first ``n`` prompts (``--limit`` on the command line).

    Returns:
        The :class:`PromptSet`; its prompts are never empty.

    Raises:
        SafegeomError: unknown name or split (NotFoundError), missing file or column, unsupported extension, empty set.
    """
    if n is not None and n < 1:
        raise SafegeomError(f"n (--limit) must be a positive number of prompts, got {n}")
    if isinstance(spec, PromptSet):
        result = spec
    elif callable(getattr(spec, "as_prompt_set", None)):  # an attack set: its adversarial prompts
        result = spec.as_prompt_set()  # type: ignore[union-attr]
    elif isinstance(spec, (str, Path)):
        result = _load_spec(str(spec), column=column, completion_column=completion_column)
    elif isinstance(spec, Sequence) and all(isinstance(p, str) for p in spec):
        result = PromptSet(name="inline", prompts=tuple(spec), source="inline")
    else:
        raise SafegeomError(
            f"cannot load prompts from {type(spec).__name__}; pass a bundled name, a file path, "
            "a list of strings or a PromptSet"
        )
    if len(result) == 0:
        raise SafegeomError(f"prompt set {result.name!r} is empty; give at least one prompt")
    return result if n is None else result.take(n)


def split_counts(name: str) -> dict[str, int]:
    """Return the sizes of the ``train``, ``val`` and ``test`` splits of a bundled set.

    Args:
        name: A bundled name from :data:`BUNDLED` (without a split suffix).

    Returns:
        ``{"train": int, "val": int, "test": int}``; a split the set does not have counts 0
        (``harmbench`` has no train split, ``strongreject`` only a test split).
    """
    _check_name(name)
    return {s: len(_split_indices(name, s)) if has_split(name, s) else 0 for s in SPLITS}


def _load_spec(spec: str, *, column: str | None, completion_column: str | None) -> PromptSet:
    """Resolve a string spec to a bundled set (with optional split) or a user file."""
    base, sep, split = spec.partition(":")
    if base in BUNDLED:
        if not sep:
            return _load_bundled(base, None)
        if split not in SPLITS:
            have = [f"{base}:{s}" for s in SPLITS if has_split(base, s)]
            use = " or ".join(filter(None, (", ".join(have[:-1]), have[-1])))
            raise NotFoundError(f"unknown split {split!r} in {spec!r}; use {use}")
        _check_split(base, split)
        return _load_bundled(base, split)
    path = Path(spec).expanduser()
    if path.suffix.lower() in SUFFIXES or path.exists() or "/" in spec or "\\" in spec:
        return _load_file(path, column=column, completion_column=completion_column)
    raise NotFoundError(
        f"unknown prompt set {spec!r}; known names: {', '.join(BUNDLED)} "
        "(optionally :train/:val/:test), or give a path to a .csv/.json/.jsonl file"
    )


def _load_bundled(name: str, split: str | None) -> PromptSet:
    """Build the PromptSet for a bundled set, whole (file order) or one split."""
    spec = BUNDLED_SPECS[name]
    rel = _pool_file(name, split)
    rows = _bundled_rows(name, rel)
    indices = range(len(rows)) if split is None else _split_indices(name, split)
    picked = [rows[i] for i in indices]
    return PromptSet(
        name=name if split is None else f"{name}:{split}",
        prompts=tuple(r[0] for r in picked),
        completions=tuple(str(r[1]) for r in picked) if spec.completion or spec.targets else None,
        categories=tuple(str(r[2]) for r in picked) if spec.category else None,
        source=f"safegeom/data/{rel}",
        split=split,
    )


# --- user files -------------------------------------------------------------------------------------


def _load_file(path: Path, *, column: str | None, completion_column: str | None) -> PromptSet:
    """Load a user CSV/JSON/JSONL file into a PromptSet."""
    if path.suffix.lower() not in SUFFIXES:
        raise SafegeomError(
            f"unsupported prompt file type {path.suffix or '(none)'!r} for {str(path)!r}; "
            "use .csv, .json or .jsonl"
        )
    if not path.is_file():
        raise NotFoundError(f"prompt file {str(path)!r} does not exist")
    stat = path.stat()
    records = read_records_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if not records:
        raise SafegeomError(f"prompt file {str(path)!r} is empty; give at least one prompt")
    names = column_names(records)
    prompt_col = find_column(names, column, DEFAULT_COLUMNS, path, option="column")
    comp_col = (
        find_column(names, completion_column, (), path, option="completion_column")
        if completion_column is not None
        else None
    )
    return PromptSet(
        name=str(path),
        prompts=tuple(text_field(r, prompt_col, str(path), i) for i, r in enumerate(records)),
        completions=(
            tuple(text_field(r, comp_col, str(path), i) for i, r in enumerate(records))
            if comp_col is not None
            else None
        ),
        source=str(path),
    )


# --- helpers ----------------------------------------------------------------------------------------


def _pick(values: tuple[str, ...] | None, indices: Sequence[int]) -> tuple[str, ...] | None:
    """Return ``values`` restricted to ``indices``, or None if there are none."""
    return None if values is None else tuple(values[i] for i in indices)


def _hash_texts(h: hashlib._Hash, label: bytes, texts: Sequence[str]) -> None:
    """Feed a labelled, length-prefixed sequence of texts into ``h`` (unambiguous framing)."""
    h.update(label + b"\x00" + len(texts).to_bytes(8, "big"))
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "big") + b)
