"""The values of refusal-direction selection, and how they are saved and loaded back.

- :class:`SelectionConfig`: the settings (each field is a ``safegeom carriers`` flag);
- :class:`DimCandidates`: the float64 diff-in-means candidates at every (position, layer);
- :class:`RefusalSelection`: the selected carrier, the candidate table and its cost.

A saved selection is a folder: ``refusal.safetensors`` (+ ``.json``) for the carrier,
``candidates.parquet`` for the score table, ``dim_candidates.safetensors`` for the candidate
vectors (when kept) and ``selection.json`` (cost and provenance). :func:`load_selection` reads it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from jaxtyping import Float
from torch import Tensor

from safegeom.artifacts import (
    Provenance,
    read_json,
    read_parquet,
    read_safetensors,
    save_parquet,
    save_safetensors,
    write_json,
)
from safegeom.carriers.carrier import Carrier, load_carrier
from safegeom.config import check
from safegeom.errors import ArtifactError, NotFoundError

__all__ = ["DimCandidates", "RefusalSelection", "SelectionConfig", "load_selection"]

CANDIDATES_FORMAT = "safegeom.dim_candidates/1"
SELECTION_FORMAT = "safegeom.refusal_selection/1"


@dataclass(frozen=True)
class SelectionConfig:
    """Settings of refusal-direction extraction; defaults follow Arditi et al. 2024."""

    n_train: int = 128
    """Prompts per class used for the means."""
    n_val: int = 32
    """Prompts per class used for selection (both classes get the same number)."""
    positions: str = "t_post"
    """Candidate positions (default: every post-instruction template token)."""
    filter_train: bool = field(default=True, metadata={"flag": "--filter"})
    """Keep harmful prompts with refusal score > 0 and harmless ones < 0 before fitting
    (--no-filter skips it)."""
    max_layer_fraction: float = 0.8
    """Discard candidates at layers ≥ this fraction of the depth (in (0, 1])."""
    max_kl: float = 0.1
    """Discard candidates whose ablation moves harmless next-token distributions more (nats)."""
    min_induce: float = 0.0
    """Discard candidates whose addition does not make harmless prompts refuse at least this much."""
    batch_size: int = 64
    """Rows per batched scoring pass."""
    system: str | None = None
    """Optional system prompt."""
    refusal_tokens: tuple[int, ...] | None = None
    """Override of the refusal first tokens, as token ids (default: derived from the tokenizer)."""

    def __post_init__(self) -> None:
        check(self.n_train >= 1, "n_train", "must be at least 1", self.n_train)
        check(self.n_val >= 1, "n_val", "must be at least 1", self.n_val)
        check(self.batch_size >= 1, "batch_size", "must be at least 1", self.batch_size)
        fraction = float(self.max_layer_fraction)
        check(
            math.isfinite(fraction) and 0 < fraction <= 1,
            "max_layer_fraction",
            "must lie in (0, 1] (0 would discard every layer)",
            self.max_layer_fraction,
        )
        check(not math.isnan(float(self.max_kl)), "max_kl", "must be a number", self.max_kl)
        check(
            not math.isnan(float(self.min_induce)),
            "min_induce",
            "must be a number",
            self.min_induce,
        )


@dataclass(frozen=True)
class DimCandidates:
    """Diff-in-means candidates ``[n_pos, n_layers, d]`` (float64) with their coordinates."""

    vectors: Float[Tensor, "pos layer d"]
    positions: tuple[str, ...]
    layers: tuple[int, ...]
    n_harmful: int
    n_harmless: int
    provenance: Provenance = field(default_factory=Provenance)
    n_forward: int = 0
    """Forward passes (batches) the two captures ran."""

    def __post_init__(self) -> None:
        if not isinstance(self.provenance, Provenance):
            object.__setattr__(self, "provenance", Provenance.from_dict(dict(self.provenance)))

    def flat(self) -> tuple[Float[Tensor, "C d"], list[int], list[str]]:
        """Candidates as rows, with the layer and position label of each row."""
        n_pos, n_layers, d = self.vectors.shape
        layers = [self.layers[j] for _ in range(n_pos) for j in range(n_layers)]
        positions = [self.positions[i] for i in range(n_pos) for _ in range(n_layers)]
        return self.vectors.reshape(n_pos * n_layers, d), layers, positions

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the vectors (float64) and coordinates as one safetensors file.

        Returns:
            The path written.
        """
        meta = {
            "format": CANDIDATES_FORMAT,
            "positions": list(self.positions),
            "layers": list(self.layers),
            "n_harmful": self.n_harmful,
            "n_harmless": self.n_harmless,
            "n_forward": self.n_forward,
            "provenance": self.provenance.to_dict(),
        }
        return save_safetensors(path, {"vectors": self.vectors}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DimCandidates:
        """Read what :meth:`save` wrote.

        Returns:
            The :class:`DimCandidates`.

        Raises:
            NotFoundError: no file at ``path``.
            ArtifactError: the file is truncated or not saved candidates.
        """
        tensors, meta = read_safetensors(path, what="candidate file")
        if meta.get("format") != CANDIDATES_FORMAT or "vectors" not in tensors:
            raise ArtifactError(f"{path} is not a safegeom candidate file")
        return cls(
            vectors=tensors["vectors"],
            positions=tuple(meta["positions"]),
            layers=tuple(int(x) for x in meta["layers"]),
            n_harmful=int(meta["n_harmful"]),
            n_harmless=int(meta["n_harmless"]),
            provenance=Provenance.from_dict(meta.get("provenance", {})),
            n_forward=int(meta.get("n_forward", 0)),
        )


@dataclass(frozen=True)
class RefusalSelection:
    """The selected carrier plus the full candidate table and the cost of the selection."""

    carrier: Carrier
    table: pd.DataFrame
    """One row per candidate: position, layer, bypass, induce, kl, norm, kept, reason."""
    n_forward_passes: int
    n_rows: int
    seconds: float
    candidates: DimCandidates | None = None
    """The candidate vectors the table scores (kept so that the selection can be redone)."""

    @property
    def provenance(self) -> Provenance:
        """The selected carrier's provenance (model, weights, train and validation sets)."""
        return self.carrier.provenance

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``refusal.safetensors`` (+ ``.json``), ``candidates.parquet``,
        ``dim_candidates.safetensors`` (when kept) and ``selection.json`` into ``folder``.

        Returns:
            The folder.
        """
        out = Path(folder)
        self.carrier.save(out / "refusal")
        save_parquet(out / "candidates.parquet", self.table)
        if self.candidates is not None:
            self.candidates.save(out / "dim_candidates.safetensors")
        write_json(out / "selection.json", self._meta())
        return out

    def _meta(self) -> dict[str, Any]:
        return {
            "format": SELECTION_FORMAT,
            "n_forward_passes": self.n_forward_passes,
            "n_rows": self.n_rows,
            "seconds": self.seconds,
            "has_candidates": self.candidates is not None,
            "provenance": self.provenance.to_dict(),
        }

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> RefusalSelection:
        """Read what :meth:`save` wrote (see :func:`load_selection`)."""
        return load_selection(folder)


def load_selection(folder: str | os.PathLike[str]) -> RefusalSelection:
    """Read a selection written by :meth:`RefusalSelection.save`.

    Returns:
        The :class:`RefusalSelection`, with its candidates when they were saved.

    Raises:
        NotFoundError: no such folder or a missing file.
        ArtifactError: a file is truncated or of another kind.
    """
    src = Path(folder)
    if not src.is_dir():
        raise NotFoundError(f"no saved selection at {src} (not a folder)")
    meta = read_json(src / "selection.json", what="selection summary", format=SELECTION_FORMAT)
    table = read_parquet(src / "candidates.parquet", what="candidate table")
    candidates = None
    if meta.get("has_candidates"):
        candidates = DimCandidates.load(src / "dim_candidates.safetensors")
    return RefusalSelection(
        carrier=load_carrier(src / "refusal.safetensors"),
        table=table,
        n_forward_passes=int(meta["n_forward_passes"]),
        n_rows=int(meta["n_rows"]),
        seconds=float(meta["seconds"]),
        candidates=candidates,
    )
