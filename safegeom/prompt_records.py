"""Reading prompt records from CSV, JSON (array) and JSONL files, and picking their columns."""

from __future__ import annotations

import csv
import functools
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from safegeom.errors import NotFoundError, SafegeomError

__all__ = [
    "SUFFIXES",
    "Record",
    "column_names",
    "find_column",
    "read_records",
    "read_records_cached",
    "text_field",
]

SUFFIXES: tuple[str, ...] = (".csv", ".json", ".jsonl")
Record = Mapping[str, object]


@functools.lru_cache(maxsize=64)
def read_records_cached(path: str, mtime_ns: int, size: int) -> tuple[Record, ...]:
    """Read a user file; keyed on modification time and size so edits are picked up."""
    del mtime_ns, size  # part of the cache key only
    return read_records(Path(path))


def read_records(path: Path, *, check_quotes: bool = True) -> tuple[Record, ...]:
    """Parse a CSV, JSON (array) or JSONL file into a tuple of records (dicts).

    A JSON/JSONL item that is a bare string becomes ``{"prompt": item}``. ``check_quotes=False``
    skips the CSV check for a quote closed rows later (a heuristic for user files; the bundled
    files, whose bytes are pinned by hash, hold multi-line fields that it would misread).

    Returns:
        The records, in file order.
    """
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SafegeomError(
            f"prompt file {str(path)!r} is not UTF-8 text (byte {err.start} is "
            f"{err.object[err.start : err.start + 1]!r}); re-save it as UTF-8"
        ) from None
    except FileNotFoundError:
        raise NotFoundError(f"prompt file {str(path)!r} does not exist") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if suffix == ".csv":
        return _read_csv(text, path, check_quotes=check_quotes)
    try:
        if suffix == ".jsonl":
            items = [json.loads(line) for line in text.split("\n") if line.strip()]
        else:
            items = json.loads(text)
    except json.JSONDecodeError as err:
        raise SafegeomError(f"cannot parse {str(path)!r} as {suffix[1:].upper()}: {err}") from None
    if suffix == ".json" and not isinstance(items, list):
        raise SafegeomError(f"{str(path)!r} must hold a JSON array of objects or strings")
    records: list[Record] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            records.append({"prompt": item})
        elif isinstance(item, dict):
            records.append(item)
        else:
            raise SafegeomError(
                f"{str(path)!r} item {i} is {type(item).__name__}; expected an object or a string"
            )
    return tuple(records)


def _read_csv(text: str, path: Path, *, check_quotes: bool = True) -> tuple[Record, ...]:
    """Parse CSV ``text`` into records, refusing an unterminated quote.

    An unterminated quote makes ``csv`` read every following line into one field, so rows merge
    into one prompt without a word. It is caught two ways: ``csv`` reaching the end of the file
    inside a quoted field (``strict`` mode), and a field holding a line break followed by a line
    that would have parsed as a row of the same width on its own (skipped with
    ``check_quotes=False``).

    Returns:
        The rows as records, in file order.

    Raises:
        SafegeomError: a quote is not closed; the message names the file and the row.
    """
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    rows: list[Record] = []
    line_of_row = 2
    try:
        for row in reader:
            rows.append(dict(row))
            line_of_row = reader.line_num + 1
    except csv.Error as err:
        start = line_of_row
        raise SafegeomError(
            f"{str(path)!r} row {len(rows)} (from line {start}): {err}; "
            'a quote (") is not closed, so the rows after it would merge into one prompt'
        ) from None
    width = len(reader.fieldnames or ())
    for i, row in enumerate(rows if check_quotes else ()):
        for value in row.values():
            if not isinstance(value, str) or "\n" not in value:
                continue
            after = value.split("\n", 1)[1].splitlines()
            if any(_looks_like_row(line, width) for line in after if line.strip()):
                raise SafegeomError(
                    f"{str(path)!r} row {i}: a quoted field runs over {len(after) + 1} lines that "
                    f'look like rows of their own; close the quote (") it opens, or double '
                    "the quotes inside it"
                )
    return tuple(rows)


def _looks_like_row(line: str, width: int) -> bool:
    """Whether ``line`` alone parses as a CSV row of ``width`` fields with balanced quotes."""
    if width < 2 or line.count('"') % 2:
        return False
    try:
        parsed = next(csv.reader([line], strict=True))
    except (csv.Error, StopIteration):
        return False
    return len(parsed) == width


def column_names(records: Sequence[Record]) -> list[str]:
    """Return the column names present in ``records``, in first-seen order."""
    seen: dict[str, None] = {}
    for r in records:
        seen.update(dict.fromkeys(r))
    return [c for c in seen if c is not None]


def find_column(
    names: Sequence[str], wanted: str | None, defaults: Sequence[str], path: Path, *, option: str
) -> str:
    """Return the actual column name matching ``wanted`` (or the first default), case-insensitively."""
    candidates = [wanted] if wanted is not None else list(defaults)
    for cand in candidates:
        if cand in names:
            return cand
        folded = [c for c in names if c.casefold() == cand.casefold()]
        if folded:
            return folded[0]
    asked = f"no column {wanted!r}" if wanted is not None else f"none of {', '.join(defaults)}"
    raise SafegeomError(
        f"{str(path)!r} has {asked}; its columns are {', '.join(map(repr, names)) or '(none)'}; "
        f"pick one with {_FLAGS.get(option, f'the {option}= option')}"
    )


_FLAGS = {"column": "--column (column= in Python)"}


def text_field(record: Record, key: str, where: str, i: int) -> str:
    """Return ``record[key]`` as a non-empty str, or raise a SafegeomError naming the row."""
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise SafegeomError(f"{where!r} row {i}: column {key!r} is missing or empty")
    return value
