"""The standard set of carriers of one model, extracted together and saved as one folder.

:func:`extract_carriers` runs refusal-direction selection (diff-in-means at ``t_post`` + bypass,
induce and KL selection), the harmfulness direction at ``t_inst`` of the same layer, and the cheap
refusal cone; it reports the H/R coupling and the cone's effective rank. :meth:`CarrierSuite.save`
writes the selection (``refusal`` carrier, ``candidates.parquet``, ``dim_candidates.safetensors``,
``selection.json``), the ``harmfulness`` and ``cone`` carriers (safetensors + JSON),
``summary.json`` and ``suite.json`` (format and provenance); :func:`load_suite` reads it back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safegeom.artifacts import Provenance, read_json, write_json
from safegeom.carriers.carrier import Carrier, load_carrier
from safegeom.carriers.common import encode
from safegeom.carriers.cones import cheap_cone
from safegeom.carriers.harmfulness import harmfulness_direction
from safegeom.carriers.refusal import RefusalSelection, SelectionConfig, refusal_direction
from safegeom.carriers.selection import load_selection
from safegeom.config import check
from safegeom.errors import NotFoundError
from safegeom.geometry import coupling
from safegeom.models.loading import LoadedModel
from safegeom.prompts import PromptSet

__all__ = ["CarrierSuite", "CarriersConfig", "extract_carriers", "load_suite"]

SUITE_FORMAT = "safegeom.carrier_suite/1"


@dataclass(frozen=True)
class CarriersConfig:
    """What ``safegeom carriers`` extracts from: the four prompt sets and the cone size (the
    selection settings are :class:`~safegeom.carriers.refusal.SelectionConfig`)."""

    harmful: str = "advbench:train"
    """Harmful prompt SPEC for the means: bundled set[:split] or a CSV/JSON/JSONL file."""
    harmless: str = "alpaca:train"
    """Harmless prompt SPEC for the means."""
    harmful_val: str = "advbench:val"
    """Harmful prompt SPEC for the selection scores."""
    harmless_val: str = "alpaca:val"
    """Harmless prompt SPEC for the selection scores."""
    cone_k: int = 3
    """Dimension of the cheap refusal cone (0: no cone)."""

    def __post_init__(self) -> None:
        _check_cone_k(self.cone_k)


def _check_cone_k(cone_k: int) -> None:
    check(
        not isinstance(cone_k, bool) and isinstance(cone_k, int) and cone_k >= 0,
        "cone_k",
        "must be a whole number ≥ 0 (1 or more: the cone's dimension; 0: no cone)",
        cone_k,
    )


@dataclass(frozen=True)
class CarrierSuite:
    """Refusal direction, harmfulness direction and refusal cone of one model."""

    selection: RefusalSelection
    harmfulness: Carrier
    cone: Carrier | None

    @property
    def refusal(self) -> Carrier:
        """The selected refusal direction."""
        return self.selection.carrier

    @property
    def hr_coupling(self) -> float:
        """|cos| between the harmfulness and refusal directions (METHODS §4 proposal)."""
        return coupling(self.harmfulness.direction, self.refusal.direction)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary: selected layer/position, scores, coupling, cone rank, cost."""
        return {
            "refusal": {
                "layer": self.refusal.layer,
                "position": self.refusal.position,
                "norm": float(self.refusal.direction.norm()),
                **self.refusal.scores,
            },
            "harmfulness": {"layer": self.harmfulness.layer, "position": self.harmfulness.position},
            "hr_coupling": self.hr_coupling,
            "cone": None
            if self.cone is None
            else {"k": self.cone.k, "layer": self.cone.layer, **self.cone.scores},
            "selection": {
                "n_candidates": len(self.selection.table),
                "n_kept": int(self.selection.table["kept"].sum()),
                "forward_passes": self.selection.n_forward_passes,
                "rows": self.selection.n_rows,
                "seconds": self.selection.seconds,
            },
            "provenance": dict(self.refusal.provenance),
        }

    @property
    def provenance(self) -> Provenance:
        """The refusal direction's provenance (model, weights, prompt sets)."""
        return self.refusal.provenance

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the selection, the carriers, ``summary.json`` and ``suite.json`` into ``folder``
        (every file atomically).

        Returns:
            The folder.
        """
        out = Path(folder)
        self.selection.save(out)
        self.harmfulness.save(out / "harmfulness")
        if self.cone is not None:
            self.cone.save(out / "cone")
        write_json(out / "summary.json", self.summary())
        write_json(
            out / "suite.json",
            {
                "format": SUITE_FORMAT,
                "has_cone": self.cone is not None,
                "provenance": self.provenance.to_dict(),
            },
        )
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> CarrierSuite:
        """Read what :meth:`save` wrote (see :func:`load_suite`)."""
        return load_suite(folder)


def load_suite(folder: str | os.PathLike[str]) -> CarrierSuite:
    """Read a carrier suite written by :meth:`CarrierSuite.save`.

    Returns:
        The :class:`CarrierSuite` (selection with its candidates, harmfulness, cone).

    Raises:
        NotFoundError: no such folder, or a file of the suite is missing.
        ArtifactError: a file is truncated or of another kind.
    """
    src = Path(folder)
    if not src.is_dir():
        raise NotFoundError(f"no carrier suite at {src} (not a folder)")
    meta = read_json(src / "suite.json", what="carrier suite", format=SUITE_FORMAT)
    cone = load_carrier(src / "cone.safetensors") if meta.get("has_cone") else None
    return CarrierSuite(
        selection=load_selection(src),
        harmfulness=load_carrier(src / "harmfulness.safetensors"),
        cone=cone,
    )


def extract_carriers(
    lm: LoadedModel,
    harmful: PromptSet | str = "advbench:train",
    harmless: PromptSet | str = "alpaca:train",
    harmful_val: PromptSet | str = "advbench:val",
    harmless_val: PromptSet | str = "alpaca:val",
    config: SelectionConfig = SelectionConfig(),
    *,
    cone_k: int = 3,
    progress: bool = True,
) -> CarrierSuite:
    """Extract the refusal direction, the harmfulness direction and (``cone_k > 0``) the cheap cone.

    The harmfulness direction and the cone use the same training prompts (first ``n_train`` of
    each class) and the refusal direction's layer.

    Returns:
        The :class:`CarrierSuite`.

    Raises:
        ConfigError: ``cone_k`` is negative.
        SafegeomError: see :func:`~safegeom.carriers.refusal.refusal_direction`.
    """
    _check_cone_k(cone_k)
    system = config.system  # each set is encoded once and shared by the three carriers
    h_set, s_set = (encode(lm, p, system, take=config.n_train) for p in (harmful, harmless))
    hv, sv = (encode(lm, p, system, take=config.n_val) for p in (harmful_val, harmless_val))
    selection = refusal_direction(lm, h_set, s_set, hv, sv, config, progress=progress)
    harm = harmfulness_direction(
        lm, h_set, s_set, refusal=selection.carrier, system=system, progress=progress
    )
    cone = None
    if cone_k > 0:
        cone = cheap_cone(
            lm, h_set, s_set, k=cone_k, refusal=selection.carrier, harmful_val=hv,
            harmless_val=sv, system=config.system, progress=progress,
        )  # fmt: skip
    return CarrierSuite(selection=selection, harmfulness=harm, cone=cone)
