"""An audit read back: :class:`AuditResult` (the tidy table, the manifest, wide views) and
:func:`load_audit`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pandas as pd

from safegeom.artifacts import read_json
from safegeom.audit.schema import with_anchor
from safegeom.errors import ArtifactError, NotFoundError, SafegeomError

__all__ = ["FORMAT", "KEYS", "AuditResult", "load_audit"]

FORMAT = "safegeom.audit/1"
"""Format tag of an audit folder's ``manifest.json``."""
KEYS = ("layer", "carrier", "source", "prompts")
"""The row keys of :meth:`AuditResult.wide` (one column per metric beside them)."""


def _frozen(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


@dataclass(frozen=True, eq=False)
class AuditResult:
    """A finished audit: one tidy row per number (:mod:`safegeom.audit.schema`) and its manifest.

    Example:
        >>> from safegeom.audit.schema import frame
        >>> rows = [
        ...     {"checkpoint": "base", "step": 0, "layer": 1, "metric": "cosine_to_base", "value": 1.0},
        ...     {"checkpoint": "step-000040", "step": 40, "layer": 1, "metric": "cosine_to_base",
        ...      "value": 0.8},
        ... ]
        >>> result = AuditResult(frame(rows), manifest={})
        >>> result.checkpoints
        ('base', 'step-000040')
        >>> result.wide(40)[["layer", "cosine_to_base"]]
           layer  cosine_to_base
        0      1             0.8
    """

    table: pd.DataFrame
    """All rows, in step order (columns :data:`~safegeom.audit.schema.COLUMNS`)."""
    manifest: Mapping[str, Any]
    """The manifest (read-only): config, seeds, versions, git SHA, weight hashes, timings."""
    root: Path | None = None
    """The audit folder it was read from, when it was."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "manifest", _frozen(dict(self.manifest)))

    @property
    def checkpoints(self) -> tuple[str, ...]:
        """Checkpoint labels in step order (the base first)."""
        order = self.table.drop_duplicates("checkpoint").sort_values("step", kind="stable")
        return tuple(str(c) for c in order["checkpoint"])

    @property
    def steps(self) -> tuple[int, ...]:
        """Steps of :attr:`checkpoints`, in the same order."""
        order = self.table.drop_duplicates("checkpoint").sort_values("step", kind="stable")
        return tuple(int(s) for s in order["step"])

    def wide(self, checkpoint: str | int) -> pd.DataFrame:
        """One checkpoint's numbers as a wide table.

        Args:
            checkpoint: a label (``base``, ``step-000040``) or a step.

        Returns:
            One row per (layer, carrier, source, prompts), one column per metric (its value);
            an audit with anchors (``--anchor``) gets the key ``anchor`` after ``source``.

        Raises:
            SafegeomError: no such checkpoint in the table.
        """
        column = "step" if isinstance(checkpoint, int) else "checkpoint"
        rows = self.table[self.table[column] == checkpoint]
        if rows.empty:
            raise SafegeomError(
                f"no checkpoint {checkpoint!r} in this audit; it has {', '.join(self.checkpoints)}"
            )
        keys = list(KEYS)
        if rows["anchor"].dropna().nunique() > 1:  # the geometry against several references
            keys.insert(keys.index("source") + 1, "anchor")
        grouped = rows.groupby([*keys, "metric"], dropna=False, sort=False)["value"].first()
        wide = grouped.unstack("metric").reset_index()
        wide.columns.name = None
        metrics = list(dict.fromkeys(rows["metric"]))  # first-seen order
        return wide[[*keys, *metrics]].astype({"layer": "Int64"})


def load_audit(folder: str | Path) -> AuditResult:
    """Read an audit folder written by :func:`~safegeom.audit.runner.audit` (``sg.load_audit``);
    a table saved before the ``anchor`` column existed gets it (:func:`with_anchor`).

    Returns:
        The :class:`AuditResult`.

    Example:
        A folder holding the two files an audit leaves (here a two-row table written by hand):

        >>> import tempfile
        >>> import safegeom as sg
        >>> from safegeom.artifacts import save_parquet, write_json
        >>> from safegeom.audit.schema import frame
        >>> folder = Path(tempfile.mkdtemp()) / "audit"
        >>> rows = [
        ...     {"checkpoint": c, "step": s, "layer": 1, "metric": "cosine_to_base", "value": v}
        ...     for c, s, v in (("base", 0, 1.0), ("step-000040", 40, 0.8))
        ... ]
        >>> _ = save_parquet(folder / "audit.parquet", frame(rows))
        >>> _ = write_json(folder / "manifest.json", {"format": FORMAT, "complete": True})
        >>> result = sg.load_audit(folder)
        >>> result.steps, result.wide(40)["cosine_to_base"].tolist()
        ((0, 40), [0.8])

    Raises:
        NotFoundError: no such folder.
        ArtifactError: the folder holds no audit (no or a foreign manifest), or an unfinished one.
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotFoundError(f"no audit folder at {root}")
    file = root / "manifest.json"
    if not file.is_file():
        raise ArtifactError(f"{root} holds no audit: manifest.json is missing")
    manifest = read_json(file, what="audit manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{file} is not a safegeom audit manifest (format {FORMAT!r})")
    table_file = root / "audit.parquet"
    if not manifest.get("complete") or not table_file.is_file():
        raise ArtifactError(
            f"the audit in {root} is unfinished; rerun the same audit command to complete it"
        )
    try:
        table = pd.read_parquet(table_file)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise ArtifactError(f"{table_file} is not a readable Parquet table ({err})") from None
    return AuditResult(table=with_anchor(table), manifest=manifest, root=root)
