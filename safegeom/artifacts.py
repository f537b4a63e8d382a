"""One artifact layer: atomic writes of JSON, safetensors and Parquet, and the typed Provenance.

Every file the package writes goes through :func:`atomic_write`: a temporary file in the target's
own folder, flushed and ``fsync``-ed, then renamed over the target, and removed if anything fails,
so a reader sees the old file or the new one, never half of one. It replaces only a regular file
(:mod:`safegeom.file_modes`; a link is followed and kept); files get the user's umask.

Every result carries a :class:`Provenance`: what model (name and weight hash), which prompt sets
(name → content hash), which config, which safegeom version and git commit, and when. It reads
like a mapping (``prov["weight_hash"]``, ``{**prov, "k": v}``) so that result-specific keys sit
beside the typed fields in ``extra``.

Example:
    >>> import tempfile, pathlib
    >>> from safegeom.artifacts import write_json, read_json
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "result.json"
    >>> write_json(path, {"refusal": 0.97})
    PosixPath('...result.json')
    >>> read_json(path)["refusal"]
    0.97
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import importlib.metadata
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

from safegeom.errors import ArtifactError, NotFoundError, OutputPathError
from safegeom.file_modes import (
    check_output_dir,
    check_output_file,
    file_mode,
    follow_umask,
    refuse_special,
)

__all__ = [
    "PARQUET_MARK",
    "VERSION",
    "Provenance",
    "atomic_write",
    "check_output_dir",
    "check_output_file",
    "file_mode",
    "follow_umask",
    "git_sha",
    "read_json",
    "read_parquet",
    "read_safetensors",
    "save_parquet",
    "save_safetensors",
    "sha256_bytes",
    "sha256_text",
    "write_json",
    "write_text",
]


def _installed_version() -> str:
    """The version of the installed package (pyproject.toml's, its one source), or ``unknown``
    when the code runs from a checkout that was never installed."""
    try:
        return importlib.metadata.version("safegeom")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


VERSION = _installed_version()
"""safegeom's version (also ``safegeom.__version__``), read once from the package metadata."""


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str | None) -> str:
    """Hex sha256 of ``text`` as UTF-8 (``''`` for ``None``)."""
    return "" if text is None else sha256_bytes(text.encode("utf-8"))


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    The temporary file is removed when the body raises (``KeyboardInterrupt`` included). The
    parent folder is created when missing. A symbolic link at ``path`` is followed: the file it
    names is replaced, the link is kept.

    Raises:
        OutputPathError: the folder cannot be created or written, or ``path`` is a folder, a
            device node, a FIFO or a socket (checked again just before the rename).
    """
    target = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    if target.is_dir():
        raise OutputPathError(f"{target} is a folder; give a file path")
    refuse_special(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except PermissionError:
        raise OutputPathError(f"cannot write {target}: its folder is not writable") from None
    except OSError as err:
        raise OutputPathError(f"cannot write {target}: {err.strerror or err}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())
        refuse_special(target)  # it may have appeared while the body ran
        os.replace(tmp, target)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if _disk_full(err):
            raise OutputPathError(
                f"cannot write {target}: no space left on device; free some space (or write "
                "elsewhere) and rerun"
            ) from None
        raise
    return


def _disk_full(err: BaseException) -> bool:
    """Whether ``err`` says the disk (or the user's quota) is full; writers outside Python
    (safetensors) report it only in their message."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "os error 28" in text


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) atomically; returns the path written."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike[str], payload: Any) -> Path:
    """Write ``payload`` as indented, key-sorted JSON atomically; returns the path written."""
    return write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Provenance):
        return value.to_dict()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    return str(value)


def read_json(
    path: str | os.PathLike[str], *, what: str = "file", format: str | None = None
) -> Any:
    """Read a JSON file written by :func:`write_json`.

    Args:
        what: what the file should be, for the messages ("carrier suite").
        format: when given, the document must be an object whose ``"format"`` is this tag.

    Raises:
        NotFoundError: there is no such file.
        ArtifactError: the file is not valid UTF-8 JSON, or not of ``format`` (the message names
            the file and ``what``).
    """
    target = Path(path)
    if not target.is_file():
        raise NotFoundError(f"no {what} at {target}")
    try:
        data = json.loads(target.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{target} is not a readable {what} (bad JSON: {err})") from None
    if format is not None:
        got = data.get("format") if isinstance(data, Mapping) else type(data).__name__
        if got != format:
            raise ArtifactError(f"{target} is not a {what} (format {got!r})")
    return data


def read_parquet(path: str | os.PathLike[str], *, what: str = "table") -> Any:
    """Read a Parquet table written by :func:`save_parquet` as a pandas DataFrame.

    Raises:
        NotFoundError: there is no such file.
        ArtifactError: the file is truncated or not Parquet.
    """
    import pandas as pd

    target = Path(path)
    if not target.is_file():
        raise NotFoundError(f"no {what} at {target}")
    try:
        return pd.read_parquet(target)
    except Exception as err:  # pyarrow raises several kinds of error for a damaged file
        raise ArtifactError(f"{target} is not a readable {what} ({err})") from None


def save_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, Any], metadata: Mapping[str, Any]
) -> Path:
    """Write tensors atomically with ``metadata`` as one JSON string under the ``safegeom`` key.

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    header = {"safegeom": json.dumps(dict(metadata), sort_keys=True, default=_jsonable)}
    with atomic_write(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=header)
    return Path(path)


def read_safetensors(
    path: str | os.PathLike[str], *, what: str = "file", device: str = "cpu"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a file written by :func:`save_safetensors`: ``(tensors, metadata)``.

    Raises:
        NotFoundError: there is no such file.
        ArtifactError: the file is truncated, not safetensors, or has no safegeom metadata.
    """
    from safetensors import SafetensorError, safe_open

    target = Path(path)
    if not target.is_file():
        raise NotFoundError(f"no {what} at {target}")
    try:
        with safe_open(str(target), framework="pt", device=device) as handle:
            raw = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(
            f"{target} is not a readable {what} (truncated or not safetensors: {err})"
        ) from None
    if "safegeom" not in raw:
        raise ArtifactError(f"{target} holds no safegeom metadata; it is not a saved {what}")
    try:
        return tensors, json.loads(raw["safegeom"])
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{target}: its safegeom metadata is not JSON ({err})") from None


PARQUET_MARK = b"safegeom"
"""Key of the Parquet schema metadata that marks a table as written by safegeom (its version)."""


def save_parquet(path: str | os.PathLike[str], table: Any) -> Path:
    """Write a pandas DataFrame as Parquet atomically (no index), its schema metadata marked
    with :data:`PARQUET_MARK`; returns the path written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(table, preserve_index=False)
    marked = {**(arrow.schema.metadata or {}), PARQUET_MARK: VERSION.encode()}
    with atomic_write(path) as tmp:
        pq.write_table(arrow.replace_schema_metadata(marked), tmp)
    return Path(path)


@cache
def git_sha() -> str | None:
    """The git commit of the safegeom source tree, when it is a checkout (else ``None``)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Provenance(Mapping[str, Any]):
    """Where a result came from; carried by every saved result and read back with it.

    It is a read-only mapping over its fields and ``extra`` (``prov["weight_hash"]``, ``{**prov}``),
    so result-specific facts (sites, layers, the intervention, a seed) sit beside the typed ones.
    """

    model: str = ""
    """What the caller named: ``tiny-chat``, a path or a hub id."""
    weight_hash: str = ""
    """sha256 of the weights (``fp:`` prefix: a fingerprint, for models over 10⁸ parameters)."""
    prompt_sets: Mapping[str, str] = field(default_factory=dict)
    """Prompt sets used, name (bundled spec or file path) → content hash."""
    config: Mapping[str, Any] = field(default_factory=dict)
    """The config that produced the result, as a JSON-ready mapping."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Result-specific facts (sites, layers, positions, intervention, seed, …)."""
    version: str = VERSION
    """safegeom version that wrote the result."""
    git_sha: str | None = field(default_factory=git_sha)
    """git commit of the safegeom checkout, when there is one."""
    created: str = field(default_factory=_now)
    """UTC time of creation, ISO 8601."""

    def _flat(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    def __getitem__(self, key: str) -> Any:
        return self._flat()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._flat())

    def __len__(self) -> int:
        return len(self._flat())

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))

    def with_extra(self, **extra: Any) -> Provenance:
        """A copy with ``extra`` updated by the keywords."""
        from dataclasses import replace

        return replace(self, extra={**self.extra, **extra})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping: the typed fields, and ``extra`` as its own key."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["prompt_sets"] = dict(self.prompt_sets)
        out["config"] = json.loads(json.dumps(dict(self.config), default=_jsonable))
        out["extra"] = json.loads(json.dumps(dict(self.extra), default=_jsonable))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Provenance:
        """Rebuild from :meth:`to_dict` output; unknown top-level keys go into ``extra``."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        extra = {**dict(values.pop("extra", {}) or {})}
        extra.update({k: v for k, v in data.items() if k not in known})
        values.setdefault("git_sha", None)
        values.setdefault("created", "")
        return cls(**values, extra=extra)
