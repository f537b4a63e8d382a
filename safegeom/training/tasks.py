"""Fine-tuning tasks: (prompt, response) pairs, with a held-out eval split where one is defined.

A task *spec* names one of:

==============  ======================================================================================
spec            examples
==============  ======================================================================================
``harmful[:N]``  The harmful fine-tuning attack of Qi et al. (2023): AdvBench ``train`` (312) and
                JailbreakBench harmful ``train`` (60) goals with their ``"Sure, here is ..."`` targets.
                Default N = 100 of the 372, chosen by ``PromptSet.sample(N, seed=0)`` on the pooled set
                (deterministic, content-hashed). No eval split here: measure ASR on the ``test``
                splits (``advbench:test``, ``jbb-harmful:test``), which never enter training.
``arith[:N]``    Benign synthetic addition: ``a + b`` with a, b in 0..19 in four phrasings
                (1,600 problems, generated deterministically). 200 problems form the held-out eval
                split, the other 1,400 the train pool; default N = 1000 training examples. The
                response is ``"a + b = c"``; accuracy is the exact match of the last integer in a
                generation with ``c`` (:func:`extract_answer`, :func:`exact_match`).
``sentiment[:N]`` Benign templated movie-review sentiment (SST-2-like; :mod:`safegeom.training.benign`):
                one-word answers ``positive``/``negative``; 16,000 training reviews and 200 held-out
                (100 per class), new combinations of the same vocabulary; default N = 1000. Accuracy
                is the exact match of the stripped generation with the answer.
``mix[:N]``      ``harmful`` and ``sentiment`` mixed 1:4 (20% harmful), interleaved
                deterministically; default N = 500 (100 harmful + 400 sentiment). Eval split:
                ``sentiment``'s.
``mix-arith[:N]`` ``harmful`` and ``arith`` mixed 1:4, the same way (``mix`` before the benign task
                changed: identical examples and order); default N = 500. Eval split: ``arith``'s.
``FILE.jsonl``   A user file, one JSON object a line with ``prompt`` and ``response`` string fields
                (names overridable) and an optional ``kind`` string (``harmful``/``harmless``,
                read into :attr:`Task.kinds`; ``safegeom train kl --kl-examples harmless`` reads
                it). No eval split.
==============  ======================================================================================
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from safegeom.artifacts import sha256_text
from safegeom.errors import NotFoundError, SafegeomError
from safegeom.prompts import PromptSet, load_prompts
from safegeom.task_scoring import exact_match as judged_exact_match
from safegeom.task_scoring import extract_answer
from safegeom.training.benign import SENTIMENT_EVAL_SIZE, SENTIMENT_POOL_SIZE, sentiment_items

__all__ = [
    "ARITH_EVAL_SIZE",
    "ARITH_POOL_SIZE",
    "HARMFUL_POOL_SIZE",
    "SENTIMENT_EVAL_SIZE",
    "SENTIMENT_POOL_SIZE",
    "TASK_DEFAULT_SIZES",
    "TASK_HELP",
    "Task",
    "exact_match",
    "extract_answer",
    "get_task",
]

HARMFUL_POOL_SIZE = 372
"""AdvBench train (312) + JailbreakBench harmful train (60)."""
ARITH_POOL_SIZE = 1400
"""Training pool of ``arith`` (1,600 problems minus the eval split)."""
ARITH_EVAL_SIZE = 200
"""Held-out eval problems of ``arith``."""
MIX_HARMFUL_FRACTION = 0.2
"""Fraction of harmful examples in ``mix`` and ``mix-arith``."""
TASK_DEFAULT_SIZES: dict[str, int] = {
    "harmful": 100,
    "arith": 1000,
    "sentiment": 1000,
    "mix": 500,
    "mix-arith": 500,
}
"""Default number of training examples per named task."""
TASK_HELP = (
    "harmful[:N] (AdvBench+JBB train goals with 'Sure, here is' targets; N<=372, default 100), "
    "arith[:N] (synthetic addition a+b, a,b in 0..19; N<=1400, default 1000; 200 held-out eval "
    "problems), sentiment[:N] (templated movie reviews, answer positive/negative; N<=16000, "
    "default 1000; 200 held-out reviews), mix[:N] (harmful:sentiment = 1:4, default 500), "
    "mix-arith[:N] (harmful:arith = 1:4, default 500), or a .jsonl file with prompt/response fields"
)
"""One-paragraph description of task specs, for the command line."""

_ARITH_PHRASINGS = (
    "What is {a} plus {b}?",
    "Compute {a} + {b}.",
    "Add {a} and {b}.",
    "What is the sum of {a} and {b}?",
)
_ARITH_MAX = 19


@dataclass(frozen=True)
class Task:
    """A fine-tuning task: aligned prompts and responses, and an optional held-out eval split.

    Attributes:
        name: The spec it was built from, e.g. ``"harmful"`` or ``"arith:500"`` or a file path.
        prompts: User instructions.
        responses: Target assistant responses, aligned with ``prompts``.
        eval_prompts: Held-out prompts for measuring the task skill, or ``None``.
        eval_references: Reference answers aligned with ``eval_prompts`` (compare with
            :func:`exact_match`), or ``None``.
        kinds: Each example's class as the task marks it (a JSONL ``kind``: ``"harmful"``,
            ``"harmless"``, or ``None`` where a line has none), aligned with ``prompts``; ``None``
            when no example is marked. Not part of :attr:`content_hash`.
    """

    name: str
    prompts: tuple[str, ...]
    responses: tuple[str, ...]
    eval_prompts: tuple[str, ...] | None = None
    eval_references: tuple[str, ...] | None = None
    kinds: tuple[str | None, ...] | None = None

    def __post_init__(self) -> None:
        """Check alignment and non-emptiness."""
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "responses", tuple(self.responses))
        if len(self.prompts) != len(self.responses):
            raise SafegeomError(
                f"task {self.name!r}: {len(self.prompts)} prompts but {len(self.responses)} "
                "responses; they must be aligned"
            )
        if not self.prompts:
            raise SafegeomError(f"task {self.name!r} is empty: give at least one example")
        _check_rows(self.name, self.prompts, self.responses)
        if self.kinds is not None:
            object.__setattr__(self, "kinds", tuple(self.kinds))
            if len(self.kinds) != len(self.prompts):
                raise SafegeomError(
                    f"task {self.name!r}: {len(self.kinds)} kinds for {len(self.prompts)} "
                    "examples; they must be aligned"
                )
        if (self.eval_prompts is None) != (self.eval_references is None):
            raise SafegeomError(f"task {self.name!r}: eval prompts and references go together")
        if self.eval_prompts is not None and self.eval_references is not None:
            object.__setattr__(self, "eval_prompts", tuple(self.eval_prompts))
            object.__setattr__(self, "eval_references", tuple(self.eval_references))
            if len(self.eval_prompts) != len(self.eval_references):
                raise SafegeomError(
                    f"task {self.name!r}: eval prompts and references differ in length"
                )

    def __len__(self) -> int:
        """Return the number of training examples."""
        return len(self.prompts)

    @property
    def content_hash(self) -> str:
        """Return a sha256 hex digest of the training prompts and responses (order-sensitive)."""
        h = hashlib.sha256(b"safegeom.Task.v1\x00")
        for p, r in zip(self.prompts, self.responses, strict=True):
            h.update(p.encode() + b"\x00" + r.encode() + b"\x01")
        return h.hexdigest()


def _check_rows(name: str, prompts: Sequence[str], responses: Sequence[str]) -> None:
    """Refuse an example whose prompt or response is empty (as evaluate refuses empty rows)."""
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        for text, what in ((prompt, "prompt"), (response, "response")):
            if not isinstance(text, str) or not text.strip():
                raise SafegeomError(
                    f"task {name!r} row {i}: the {what} is missing or empty; every example needs "
                    "a prompt and a response"
                )


def _parse_size(spec: str, name: str, rest: str, limit: int) -> int:
    if not rest:
        return TASK_DEFAULT_SIZES[name]
    try:
        n = int(rest)
    except ValueError:
        raise SafegeomError(f"task {spec!r}: the size after ':' must be an integer") from None
    if n < 1:
        raise SafegeomError(f"task {spec!r} is empty: the size must be at least 1")
    if n > limit:
        raise SafegeomError(f"task {spec!r}: at most {limit} examples are available")
    return n


def harmful_task(n: int = TASK_DEFAULT_SIZES["harmful"], *, name: str = "harmful") -> Task:
    """Return the harmful fine-tuning attack task: ``n`` goals with ``"Sure, here is"`` targets.

    Returns:
        A :class:`Task` of ``n`` examples sampled deterministically from AdvBench train + JBB
        harmful train (kept in pool order), without an eval split.
    """
    parts = [load_prompts("advbench:train"), load_prompts("jbb-harmful:train")]
    prompts = tuple(p for part in parts for p in part.prompts)
    completions = tuple(c for part in parts for c in (part.completions or ()))
    pool = PromptSet(name="harmful", prompts=prompts, completions=completions)
    chosen = pool.sample(n, seed=0)
    return Task(name=name, prompts=chosen.prompts, responses=chosen.completions or ())


def _arith_problems() -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """Return (train pool, eval split) of (prompt, response, answer), in a fixed hash order."""
    problems = []
    for a in range(_ARITH_MAX + 1):
        for b in range(_ARITH_MAX + 1):
            for phrasing in _ARITH_PHRASINGS:
                prompt = phrasing.format(a=a, b=b)
                problems.append((prompt, f"{a} + {b} = {a + b}", str(a + b)))
    problems.sort(key=lambda item: sha256_text(f"arith\x00{item[0]}"))
    return problems[ARITH_EVAL_SIZE:], problems[:ARITH_EVAL_SIZE]


def arith_task(n: int = TASK_DEFAULT_SIZES["arith"], *, name: str = "arith") -> Task:
    """Return the synthetic addition task with ``n`` training examples.

    Returns:
        A :class:`Task` whose eval split holds the 200 held-out problems and their answers.
    """
    train, held_out = _arith_problems()
    chosen = train[:n]
    return Task(
        name=name,
        prompts=tuple(p for p, _, _ in chosen),
        responses=tuple(r for _, r, _ in chosen),
        eval_prompts=tuple(p for p, _, _ in held_out),
        eval_references=tuple(ans for _, _, ans in held_out),
    )


def sentiment_task(n: int = TASK_DEFAULT_SIZES["sentiment"], *, name: str = "sentiment") -> Task:
    """Return the templated sentiment task with ``n`` training examples (the first ``n`` of the
    hash-ordered pool, :func:`safegeom.training.benign.sentiment_items`).

    Returns:
        A :class:`Task` whose eval split holds the 200 held-out reviews and their one-word answers.
    """
    train, held_out = sentiment_items()
    chosen = train[:n]
    return Task(
        name=name,
        prompts=tuple(p for p, _ in chosen),
        responses=tuple(a for _, a in chosen),
        eval_prompts=tuple(p for p, _ in held_out),
        eval_references=tuple(a for _, a in held_out),
    )


def _mixed(benign: Task, n_harm: int, name: str) -> Task:
    """Interleave ``benign`` with ``n_harm`` harmful examples by a salted hash of each pair."""
    pairs = list(zip(benign.prompts, benign.responses, strict=True))
    if n_harm:
        harm = harmful_task(n_harm)
        pairs += list(zip(harm.prompts, harm.responses, strict=True))
    pairs.sort(key=lambda pr: sha256_text(f"mix\x00{pr[0]}\x00{pr[1]}"))
    return Task(
        name=name,
        prompts=tuple(p for p, _ in pairs),
        responses=tuple(r for _, r in pairs),
        eval_prompts=benign.eval_prompts,
        eval_references=benign.eval_references,
    )


def mix_task(
    n: int = TASK_DEFAULT_SIZES["mix"], *, name: str = "mix", benign: str = "sentiment"
) -> Task:
    """Return ``harmful`` and a benign task mixed 1:4 (``round(0.2 n)`` harmful), interleaved by
    hash. ``benign="arith"`` is ``mix-arith`` (the ``mix`` of before, identical examples and order).

    Returns:
        A :class:`Task` of ``n`` examples with the benign task's eval split.

    Raises:
        SafegeomError: an unknown benign task, or more benign examples than its pool holds.
    """
    pools = {"sentiment": SENTIMENT_POOL_SIZE, "arith": ARITH_POOL_SIZE}
    if benign not in pools:
        raise SafegeomError(f"mix: unknown benign task {benign!r}; use sentiment or arith")
    n_harm = min(round(MIX_HARMFUL_FRACTION * n), HARMFUL_POOL_SIZE)
    n_benign = n - n_harm
    if n_benign > pools[benign]:
        raise SafegeomError(
            f"task {name!r}: at most {pools[benign]} {benign} examples are available"
        )
    task = sentiment_task(n_benign) if benign == "sentiment" else arith_task(n_benign)
    return _mixed(task, n_harm, name)


def jsonl_task(
    path: str | Path, *, prompt_field: str = "prompt", response_field: str = "response"
) -> Task:
    """Read a user JSONL file of ``{prompt_field: str, response_field: str}`` objects.

    Blank lines are skipped. An optional ``kind`` string field (``harmful``/``harmless``) marks an
    example's class: :attr:`Task.kinds` holds one per example (``None`` where a line has none), or
    is ``None`` when no line has one.

    Returns:
        A :class:`Task` named by the path, without an eval split.

    Raises:
        SafegeomError: a missing file, invalid JSON, a missing or non-string field (naming the field
            and the line; ``kind`` too where given), or an empty file.
    """
    file = Path(path)
    if not file.is_file():
        raise NotFoundError(f"no task file at {file}")
    prompts: list[str] = []
    responses: list[str] = []
    kinds: list[str | None] = []
    flags = {prompt_field: "--prompt-field", response_field: "--response-field"}
    try:
        text = file.read_text(encoding="utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise SafegeomError(
            f"task file {str(file)!r} is not UTF-8 text (byte {err.start} is "
            f"{err.object[err.start : err.start + 1]!r}); re-save it as UTF-8"
        ) from None
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SafegeomError(f"{file}:{lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise SafegeomError(f"{file}:{lineno}: expected a JSON object")
        for field, flag in flags.items():
            if field not in record:
                raise SafegeomError(
                    f"{file}:{lineno}: missing field {field!r} (name another with {flag})"
                )
            if not isinstance(record[field], str):
                raise SafegeomError(f"{file}:{lineno}: field {field!r} must be a string")
            if not record[field].strip():
                raise SafegeomError(
                    f"{file}:{lineno}: field {field!r} is empty; every example needs a prompt "
                    "and a response"
                )
        kind = record.get("kind")
        if kind is not None and not isinstance(kind, str):
            raise SafegeomError(f"{file}:{lineno}: field 'kind' must be a string")
        prompts.append(record[prompt_field])
        responses.append(record[response_field])
        kinds.append(kind)
    if not prompts:
        raise SafegeomError(f"task {str(file)!r} is empty: the file holds no examples")
    marked = tuple(kinds) if any(k is not None for k in kinds) else None
    return Task(name=str(file), prompts=tuple(prompts), responses=tuple(responses), kinds=marked)


def get_task(
    spec: str | Path | Task,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
) -> Task:
    """Build a task from a spec (see the module docstring) or pass a :class:`Task` through.

    Args:
        spec: ``harmful[:N]``, ``arith[:N]``, ``sentiment[:N]``, ``mix[:N]``, ``mix-arith[:N]``,
            a ``.jsonl`` path, or a Task.
        prompt_field: Prompt field of a JSONL file.
        response_field: Response field of a JSONL file.

    Returns:
        The :class:`Task`.

    Raises:
        SafegeomError (NotFoundError for an unknown spec or file): an unknown spec, a bad size, or a bad file (see :func:`jsonl_task`).
    """
    if isinstance(spec, Task):
        return spec
    text = str(spec)
    name, _, rest = text.partition(":")
    if name == "harmful":
        return harmful_task(_parse_size(text, name, rest, HARMFUL_POOL_SIZE), name=text)
    if name == "arith":
        return arith_task(_parse_size(text, name, rest, ARITH_POOL_SIZE), name=text)
    if name == "sentiment":
        return sentiment_task(_parse_size(text, name, rest, SENTIMENT_POOL_SIZE), name=text)
    if name in ("mix", "mix-arith"):
        benign = "sentiment" if name == "mix" else "arith"
        limit = (SENTIMENT_POOL_SIZE if name == "mix" else ARITH_POOL_SIZE) + HARMFUL_POOL_SIZE
        return mix_task(_parse_size(text, name, rest, limit), name=text, benign=benign)
    if text.endswith(".jsonl") or Path(text).is_file():
        return jsonl_task(text, prompt_field=prompt_field, response_field=response_field)
    raise NotFoundError(f"unknown task {text!r}; use {TASK_HELP}")


def exact_match(generations: Sequence[str], references: Sequence[str]) -> float:
    """Return the fraction of generations whose extracted answer equals the reference exactly
    (:func:`safegeom.judges.exact_match`, numeric answer extraction).

    Returns:
        Accuracy in [0, 1].
    """
    if not references:
        raise SafegeomError("exact_match needs at least one reference")
    hits = judged_exact_match(generations, references)
    return sum(hits) / len(hits)
