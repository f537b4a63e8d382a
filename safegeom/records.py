"""Reading prompt records from CSV, JSON (array) and JSONL files, and picking their columns."""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

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


def read_records(path: Path) -> tuple[Record, ...]:
    """Parse a CSV, JSON (array) or JSONL file into a tuple of records (dicts).

    A JSON/JSONL item that is a bare string becomes ``{"prompt": item}``.
    """
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return tuple(dict(row) for row in csv.DictReader(f))
    with path.open(encoding="utf-8") as f:
        try:
            if suffix == ".jsonl":
                items = [json.loads(line) for line in f if line.strip()]
            else:
                items = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"cannot parse {str(path)!r} as {suffix[1:].upper()}: {err}") from err
    if suffix == ".json" and not isinstance(items, list):
        raise ValueError(f"{str(path)!r} must hold a JSON array of objects or strings")
    records: list[Record] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            records.append({"prompt": item})
        elif isinstance(item, dict):
            records.append(item)
        else:
            raise ValueError(
                f"{str(path)!r} item {i} is {type(item).__name__}; expected an object or a string"
            )
    return tuple(records)


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
    raise ValueError(
        f"{str(path)!r} has {asked}; its columns are {', '.join(map(repr, names)) or '(none)'}; "
        f"pick one with the {option}= option"
    )


def text_field(record: Record, key: str, where: str, i: int) -> str:
    """Return ``record[key]`` as a non-empty str, or raise a ValueError naming the row."""
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where!r} row {i}: column {key!r} is missing or empty")
    return value
