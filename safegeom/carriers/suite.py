"""The standard set of carriers of one model, extracted together and saved as one folder.

:func:`extract_carriers` runs refusal-direction selection (diff-in-means at ``t_post`` + bypass,
induce and KL selection), then every other registered carrier type at the same layer
(:data:`~safegeom.carriers.registry.CARRIER_TYPES`: the harmfulness direction at ``t_inst``, the cheap
refusal cone, and any type registered since); it reports the H/R coupling and the cone's effective
rank. :meth:`CarrierSuite.save` writes the selection (``refusal`` carrier, ``candidates.parquet``,
``dim_candidates.safetensors``, ``selection.json``), every other carrier as ``NAME.safetensors`` +
JSON, ``summary.json`` and ``suite.json`` (format, carrier names and provenance);
:func:`load_suite` reads it back.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from safegeom.artifacts import Provenance, read_json, write_json
from safegeom.carriers.carrier import Carrier, load_carrier
from safegeom.carriers.inputs import encode
from safegeom.carriers.refusal import RefusalSelection, SelectionConfig, refusal_direction
from safegeom.carriers.registry import CARRIER_TYPES, ExtractionSets
from safegeom.carriers.selection import load_selection
from safegeom.config import check
from safegeom.errors import ConfigError, NotFoundError
from safegeom.frozen import Picklable
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
class CarrierSuite(Picklable):
    """Every carrier of one model by name: the selected refusal direction, the harmfulness
    direction, the refusal cone and any other registered type
    (:data:`~safegeom.carriers.registry.CARRIER_TYPES`)."""

    selection: RefusalSelection
    """The refusal-direction selection (its carrier is ``carriers["refusal"]``)."""
    carriers: Mapping[str, Carrier]
    """Carriers by name; ``refusal`` (the selection's carrier) is added when missing."""

    def __post_init__(self) -> None:
        given = self.carriers.get("refusal")
        if given is not None and given is not self.selection.carrier:
            raise ConfigError(
                "the suite's refusal carrier must be its selection's; leave 'refusal' out of "
                "carriers"
            )
        merged = {"refusal": self.selection.carrier, **self.carriers}
        object.__setattr__(self, "carriers", MappingProxyType(merged))

    def __getitem__(self, name: str) -> Carrier:
        """The carrier called ``name``.

        Raises:
            NotFoundError: the suite has none (the message lists what it holds).
        """
        if name not in self.carriers:
            raise NotFoundError(
                f"the suite has no {name!r} carrier (it holds {', '.join(self.carriers)}); "
                "register its type before extracting"
            )
        return self.carriers[name]

    @property
    def refusal(self) -> Carrier:
        """The selected refusal direction."""
        return self.selection.carrier

    @property
    def harmfulness(self) -> Carrier:
        """The harmfulness direction at ``t_inst`` of the refusal layer."""
        return self["harmfulness"]

    @property
    def cone(self) -> Carrier | None:
        """The cheap refusal cone (``None`` when extracted with ``cone_k=0``)."""
        return self.carriers.get("cone")

    @property
    def hr_coupling(self) -> float:
        """|cos| between the harmfulness and refusal directions (docs/methods.md §4 proposal)."""
        return coupling(self.harmfulness.direction, self.refusal.direction)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary: selected layer/position, scores, coupling, cone rank, cost, and
        the k, layer, position and scores of every other registered carrier."""
        out: dict[str, Any] = {
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
        for name, c in self.carriers.items():
            if name not in _BUILT_IN:
                out[name] = {"k": c.k, "layer": c.layer, "position": c.position, **c.scores}
        return out

    @property
    def provenance(self) -> Provenance:
        """The refusal direction's provenance (model, weights, prompt sets)."""
        return self.refusal.provenance

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the selection, every other carrier as ``NAME.safetensors`` (+ ``.json``),
        ``summary.json`` and ``suite.json`` into ``folder`` (every file atomically).

        Returns:
            The folder.
        """
        out = Path(folder)
        self.selection.save(out)
        others = [name for name in self.carriers if name != "refusal"]
        for name in others:
            self.carriers[name].save(out / name)
        write_json(out / "summary.json", self.summary())
        write_json(
            out / "suite.json",
            {
                "format": SUITE_FORMAT,
                "has_cone": self.cone is not None,
                "carriers": others,
                "provenance": self.provenance.to_dict(),
            },
        )
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> CarrierSuite:
        """Read what :meth:`save` wrote (see :func:`load_suite`)."""
        return load_suite(folder)


_BUILT_IN = ("refusal", "harmfulness", "cone")
"""The carriers :meth:`CarrierSuite.summary` lists under their own keys."""


def load_suite(folder: str | os.PathLike[str]) -> CarrierSuite:
    """Read a carrier suite written by :meth:`CarrierSuite.save` (also one saved before suites
    listed their carriers: harmfulness, and the cone when it had one).

    Returns:
        The :class:`CarrierSuite` (selection with its candidates and every saved carrier).

    Raises:
        NotFoundError: no such folder, or a file of the suite is missing.
        ArtifactError: a file is truncated or of another kind.
    """
    src = Path(folder)
    if not src.is_dir():
        raise NotFoundError(f"no carrier suite at {src} (not a folder)")
    meta = read_json(src / "suite.json", what="carrier suite", format=SUITE_FORMAT)
    names = meta.get("carriers")
    if names is None:  # written before the list existed
        names = ["harmfulness", *(["cone"] if meta.get("has_cone") else [])]
    carriers = {name: load_carrier(src / f"{name}.safetensors") for name in names}
    return CarrierSuite(selection=load_selection(src), carriers=carriers)


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
    """Extract the refusal direction, then every other registered carrier type
    (:data:`~safegeom.carriers.registry.CARRIER_TYPES`): the harmfulness direction, the cheap cone
    (``cone_k > 0``) and any registered since.

    The other carriers use the same training prompts (first ``n_train`` of each class) and the
    refusal direction's layer.

    Returns:
        The :class:`CarrierSuite`.

    Raises:
        ConfigError: ``cone_k`` is negative.
        SafegeomError: see :func:`~safegeom.carriers.refusal.refusal_direction`.
    """
    _check_cone_k(cone_k)
    system = config.system  # each set is encoded once and shared by every carrier
    h_set, s_set = (encode(lm, p, system, take=config.n_train) for p in (harmful, harmless))
    hv, sv = (encode(lm, p, system, take=config.n_val) for p in (harmful_val, harmless_val))
    selection = refusal_direction(lm, h_set, s_set, hv, sv, config, progress=progress)
    sets = ExtractionSets(h_set, s_set, hv, sv, selection.carrier, cone_k, system, progress)
    carriers: dict[str, Carrier] = {}
    for name, ctype in CARRIER_TYPES.items():
        if name == "refusal":  # the selection's
            continue
        carrier = ctype.extract_with(lm, sets)
        if carrier is not None:
            carriers[name] = carrier
    return CarrierSuite(selection=selection, carriers=carriers)
