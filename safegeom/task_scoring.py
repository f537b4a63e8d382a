"""Task scoring: the numeric answer of a completion and per-item exact match.

Used by the fine-tuning tasks (:mod:`safegeom.training.tasks`) and by
:func:`safegeom.judges.task_accuracy`. Plain string functions; nothing here loads a model.

Example:
    >>> from safegeom.task_scoring import exact_match, extract_answer
    >>> extract_answer("so the answer is 1,234.00")
    '1234'
    >>> exact_match(["3 + 4 = 7", "it is 9"], ["7", "8"])
    (True, False)
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from safegeom.errors import SafegeomError

__all__ = ["exact_match", "extract_answer"]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_answer(text: str) -> str | None:
    """The numeric answer of a completion: the number after the last ``####`` if there is one
    (GSM8K's answer marker), else the last number in the text. Commas are dropped, a trailing
    ``.0…`` removed (``"1,234.00"`` → ``"1234"``). Returns ``None`` when there is no number.
    """
    _, marker, tail = text.rpartition("####")
    pool = _NUMBER.findall(tail) if marker else []
    number = pool[0] if pool else (_NUMBER.findall(text) or [None])[-1]
    if number is None:
        return None
    number = number.replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".") or "0"
    return "0" if number in ("-0", "") else number


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> tuple[bool, ...]:
    """Per-item exact match of predictions against references.

    Where the reference holds a number (:func:`extract_answer`), both sides are compared by their
    extracted numeric answers (``"... #### 42"`` vs ``"so the answer is 42."``). Otherwise the
    strings are compared after stripping surrounding whitespace (case-sensitive).

    Returns:
        One bool per pair, ``True`` = the prediction matches its reference.

    Raises:
        SafegeomError: the sequences differ in length.
    """
    if len(predictions) != len(references):
        raise SafegeomError(
            f"exact_match needs one prediction per reference, got {len(predictions)} and "
            f"{len(references)}"
        )
    out = []
    for pred, ref in zip(predictions, references, strict=True):
        target = extract_answer(ref)
        out.append(
            extract_answer(pred) == target if target is not None else pred.strip() == ref.strip()
        )
    return tuple(out)
