""":class:`SweepResult`: a causal sweep's table with its config and provenance, saved and loaded.

On disk a sweep is ``NAME.parquet`` (the tidy table, :func:`~safegeom.artifacts.save_parquet`) and
``NAME.json`` beside it (format tag, the :class:`~safegeom.sweeps.SweepConfig` and the
:class:`~safegeom.artifacts.Provenance`: model, weight hash, prompt sets, carriers' descriptions).
Both are written atomically.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from safegeom.artifacts import Provenance, read_json, read_parquet, save_parquet, write_json
from safegeom.config import config_dict
from safegeom.sweeps.config import SweepConfig

__all__ = ["FORMAT", "SweepResult"]

FORMAT = "safegeom.sweep/1"
"""Format tag of a saved sweep's JSON sidecar."""

_STEM = "sweep"
"""File stem used when :meth:`SweepResult.save` is given a folder."""


def _paths(path: str | Path) -> tuple[Path, Path]:
    """``(parquet, sidecar)`` for a ``.parquet`` or ``.json`` file, or a folder."""
    target = Path(path)
    if target.suffix in (".parquet", ".json"):
        return target.with_suffix(".parquet"), target.with_suffix(".json")
    return target / f"{_STEM}.parquet", target / f"{_STEM}.json"


@dataclass(frozen=True, eq=False)
class SweepResult:
    """A causal sweep (:func:`~safegeom.sweeps.causal_sweep_result`): what was found and how.

    ``table`` has one row per cell × population × metric; ``config`` is the grid;
    ``provenance`` names the model, its weight hash, the prompt sets (name → hash) and, in
    ``extra["carriers"]``, each carrier's description (kind, method, layer, position, sha256).
    """

    table: pd.DataFrame
    config: SweepConfig
    provenance: Provenance

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SweepResult):
            return NotImplemented
        return (
            self.config == other.config
            and self.provenance == other.provenance
            and self.table.equals(other.table)
        )

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """The JSON sidecar: format, config, provenance and the table's columns."""
        return {
            "format": FORMAT,
            "config": config_dict(self.config),
            "provenance": self.provenance.to_dict(),
            "columns": list(self.table.columns),
            "n_rows": len(self.table),
        }

    def save(self, path: str | Path) -> Path:
        """Write the table (Parquet) and its JSON sidecar atomically.

        ``path``: a ``.parquet`` file (sidecar: the same stem, ``.json``) or a folder (files
        ``sweep.parquet`` and ``sweep.json`` in it).

        Returns:
            The Parquet path written.
        """
        table_path, sidecar = _paths(path)
        payload = self.to_dict()
        payload["table"] = table_path.name
        save_parquet(table_path, self.table)
        write_json(sidecar, payload)
        return table_path

    @classmethod
    def load(cls, path: str | Path) -> SweepResult:
        """Read a sweep written by :meth:`save` (give its ``.parquet``, its ``.json`` or the folder).

        Raises:
            NotFoundError: the table or the sidecar is missing.
            ArtifactError: the sidecar is not a saved sweep.
        """
        table_path, sidecar = _paths(path)
        data = read_json(sidecar, what="safegeom sweep sidecar", format=FORMAT)
        table_path = sidecar.with_name(str(data.get("table", table_path.name)))
        table = read_parquet(table_path, what=f"sweep table (named by {sidecar})")
        names = {f.name for f in dataclasses.fields(SweepConfig)}
        config = SweepConfig(**{k: v for k, v in dict(data["config"]).items() if k in names})
        return cls(table, config, Provenance.from_dict(data["provenance"]))
