"""The carrier registry: the one mapping from a carrier type's name to how it is fitted.

A :class:`CarrierType` names a carrier (``refusal``, ``harmfulness``, ``cone``), the positions it
reads and its fit function: per-prompt activations of both classes at one layer
(:class:`ClassActivations`) in, :class:`~safegeom.carriers.fit.Fitted` out. The carrier suite
(:func:`~safegeom.carriers.suite.extract_carriers`) and the audit's reference and geometry rows
iterate over :data:`CARRIER_TYPES`, so a new carrier type is one fit function and one
:func:`register_carrier_type` call:

>>> from safegeom.carriers.fit import diff_in_means
>>> toy = CarrierType("toy", kind="harmfulness", method="dim", position="t_inst",
...                   fit=lambda a: diff_in_means(*a.single()))
>>> toy.name, toy.position
('toy', 't_inst')

A type may also name its own extraction for the suite (``extract``: capture, fit and score, as
:func:`~safegeom.carriers.cones.cheap_cone` does); without one the suite captures ``t_inst`` and
``t_post`` at the refusal direction's layer and calls the fit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from safegeom.activations import CaptureConfig, capture
from safegeom.artifacts import Provenance
from safegeom.carriers.carrier import Carrier
from safegeom.carriers.cones import cheap_cone
from safegeom.carriers.fit import Fitted, cone_basis, diff_in_means
from safegeom.carriers.harmfulness import harmfulness_direction
from safegeom.carriers.inputs import prompt_provenance
from safegeom.errors import ConfigError, NotFoundError, SafegeomError
from safegeom.models.chat import EncodedSet
from safegeom.models.loading import LoadedModel

__all__ = [
    "CARRIER_TYPES",
    "CarrierType",
    "ClassActivations",
    "ExtractionSets",
    "carrier_type",
    "read_positions",
    "register_carrier_type",
]

CAPTURED = "t_inst,t_post"
"""The positions a generic extraction (and the audit) captures; a type reads some of them."""

_POSITION = re.compile(r"t_inst|t_post|t_post\[-[1-9][0-9]*\]")


@dataclass(frozen=True)
class ClassActivations:
    """Per-prompt activations of both classes at one layer: the input of a fit function."""

    harmful: Float[Tensor, "n pos d"]
    """Harmful prompts' activations (float64) at the positions in ``positions``."""
    harmless: Float[Tensor, "m pos d"]
    """Harmless prompts' activations at the same positions."""
    positions: tuple[str, ...]
    """The label of each position (``t_inst``, ``t_post[-2]``, ...), in template order."""
    k: int = 1
    """The dimension asked of a subspace carrier (the suite's and audit's ``cone_k``); a direction
    ignores it."""
    noise: float = 0.0
    """Vectors of at most this norm are float noise (the audit: 1e-7 of the RMS activation)."""

    def single(self) -> tuple[Float[Tensor, "n d"], Float[Tensor, "m d"]]:
        """``(harmful [n, d], harmless [m, d])`` at the one position a direction reads.

        Raises:
            SafegeomError: more than one position.
        """
        if len(self.positions) != 1:
            raise SafegeomError(
                f"a direction reads one position, got {list(self.positions)}; register the "
                "type with one position label (t_inst or t_post[-1])"
            )
        return self.harmful[:, 0], self.harmless[:, 0]


Fit = Callable[[ClassActivations], Fitted]
"""A fit function: activations in, float64 vectors (``[d]`` or ``[k, d]``) and scores out; it
raises :class:`~safegeom.errors.SafegeomError` where the carrier is undefined."""


@dataclass(frozen=True)
class ExtractionSets:
    """What the carrier suite extracts every carrier from (each set encoded once)."""

    harmful: EncodedSet
    """Harmful training prompts."""
    harmless: EncodedSet
    """Harmless training prompts."""
    harmful_val: EncodedSet
    """Harmful prompts for scores."""
    harmless_val: EncodedSet
    """Harmless prompts for scores."""
    refusal: Carrier
    """The selected refusal direction: its layer is where the other carriers are read."""
    k: int = 3
    """The cone's dimension (0: no cone)."""
    system: str | None = None
    """Optional system prompt."""
    progress: bool = False
    """Show progress bars."""


Extract = Callable[[LoadedModel, ExtractionSets], Carrier | None]
"""A type's own extraction for the suite (``None`` back: the carrier is not wanted, e.g. k = 0)."""


@dataclass(frozen=True)
class CarrierType:
    """How one named carrier is fitted from activations."""

    name: str
    """The carrier's name in suites, audit references and audit rows (``carrier`` column)."""
    kind: str
    """What it carries (:attr:`Carrier.kind`), e.g. ``refusal`` or ``harmfulness``."""
    method: str
    """How it is found (:attr:`Carrier.method`), e.g. ``dim`` or ``cone-cheap``."""
    position: str
    """The positions it reads: ``t_inst``, one ``t_post[-i]`` or ``t_post`` (every
    post-instruction token, template order)."""
    fit: Fit
    """The fit function (:data:`Fit`)."""
    extract: Extract | None = None
    """The suite's extraction of it, when it is more than capture and fit (scores, streamed means);
    default: capture at the refusal layer and :attr:`fit`."""

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError(f"a carrier type needs a name, got {self.name!r}")
        if not _POSITION.fullmatch(str(self.position)):
            raise ConfigError(
                f"carrier type {self.name!r} reads position {self.position!r}: use t_inst, t_post "
                "or one t_post[-i]"
            )

    def carrier(self, fitted: Fitted, layer: int, provenance: Provenance | None = None) -> Carrier:
        """A fit of this type at ``layer`` as a :class:`Carrier`.

        Returns:
            The carrier, with this type's kind, method and position.
        """
        return fitted.carrier(
            kind=self.kind,
            method=self.method,
            layer=layer,
            position=self.position,
            provenance=provenance,
        )

    def extract_with(self, lm: LoadedModel, sets: ExtractionSets) -> Carrier | None:
        """The suite's carrier of this type: :attr:`extract`, else capture and fit.

        Returns:
            The carrier, or ``None`` when the type's extraction declines (e.g. a cone with k = 0).
        """
        if self.extract is not None:
            return self.extract(lm, sets)
        at = sets.refusal.layer
        acts = [
            capture(
                lm,
                enc,
                CaptureConfig(
                    layers=[at], positions=CAPTURED, dtype=torch.float32, system=sets.system
                ),
                progress=sets.progress,
            )
            for enc in (sets.harmful, sets.harmless)
        ]
        if acts[0].positions != acts[1].positions:
            raise SafegeomError(
                "harmful and harmless prompts have different post-instruction positions"
            )
        inputs = read_positions(
            acts[0]["resid_pre"][:, 0].double(),
            acts[1]["resid_pre"][:, 0].double(),
            acts[0].positions,
            self.position,
            k=max(sets.k, 1),
        )
        provenance = prompt_provenance(lm, sets.harmful, sets.harmless, system=sets.system)
        return self.carrier(self.fit(inputs), at, provenance)


def read_positions(
    harmful: Float[Tensor, "n pos d"],
    harmless: Float[Tensor, "m pos d"],
    labels: Sequence[str],
    position: str,
    *,
    k: int = 1,
    noise: float = 0.0,
) -> ClassActivations:
    """The activations a type reading ``position`` gets from activations at ``labels``.

    Returns:
        :class:`ClassActivations` at every ``t_post[...]`` label for ``t_post``, else at the one
        label ``position``.

    Raises:
        SafegeomError: the position was not captured.
    """
    if position == "t_post":
        cols = [i for i, p in enumerate(labels) if p.startswith("t_post")]
    else:
        cols = [i for i, p in enumerate(labels) if p == position]
    if not cols:
        raise SafegeomError(
            f"position {position!r} was not captured (positions {list(labels)}); capture {CAPTURED}"
        )
    return ClassActivations(
        harmful=harmful[:, cols],
        harmless=harmless[:, cols],
        positions=tuple(labels[i] for i in cols),
        k=k,
        noise=noise,
    )


def _direction(acts: ClassActivations) -> Fitted:
    return diff_in_means(*acts.single())


def _cone(acts: ClassActivations) -> Fitted:
    return cone_basis(
        acts.harmful, acts.harmless, acts.k, positions=acts.positions, noise=acts.noise
    )


def _extract_harmfulness(lm: LoadedModel, sets: ExtractionSets) -> Carrier:
    return harmfulness_direction(
        lm,
        sets.harmful,
        sets.harmless,
        refusal=sets.refusal,
        system=sets.system,
        progress=sets.progress,
    )


def _extract_cone(lm: LoadedModel, sets: ExtractionSets) -> Carrier | None:
    if sets.k == 0:
        return None
    return cheap_cone(
        lm,
        sets.harmful,
        sets.harmless,
        k=sets.k,
        refusal=sets.refusal,
        harmful_val=sets.harmful_val,
        harmless_val=sets.harmless_val,
        system=sets.system,
        progress=sets.progress,
    )


CARRIER_TYPES: dict[str, CarrierType] = {
    t.name: t
    for t in (
        # the suite's and the reference's refusal direction comes from the selection
        # (docs/methods.md §1); this entry refits it per layer, at the selected position
        CarrierType("refusal", "refusal", "dim", "t_post[-1]", _direction),
        CarrierType(
            "harmfulness", "harmfulness", "dim", "t_inst", _direction, _extract_harmfulness
        ),
        CarrierType("cone", "refusal", "cone-cheap", "t_post", _cone, _extract_cone),
    )
}
"""Every carrier type, by name, in the order suites and audit rows list them."""


def register_carrier_type(ctype: CarrierType) -> CarrierType:
    """Add a carrier type to :data:`CARRIER_TYPES` (suites and audits fit it from then on).

    Returns:
        ``ctype``.

    Raises:
        ConfigError: the name is taken.
    """
    if ctype.name in CARRIER_TYPES:
        raise ConfigError(
            f"a carrier type named {ctype.name!r} is already registered; pick another name"
        )
    CARRIER_TYPES[ctype.name] = ctype
    return ctype


def carrier_type(name: str) -> CarrierType:
    """The registered type called ``name``.

    Raises:
        NotFoundError: no such type (the message lists the registered ones).
    """
    if name not in CARRIER_TYPES:
        raise NotFoundError(
            f"no carrier type {name!r} is registered (registered: {', '.join(CARRIER_TYPES)}); "
            "register it with register_carrier_type before loading or auditing it"
        )
    return CARRIER_TYPES[name]
