"""Interventions as values: ``Ablation``, ``Addition`` and ``AffineEdit``.

Each is a frozen description of *what* to do to the residual stream (which vectors, at which
layers and positions, how strongly), independent of any model. Bind it to a model to act:

- ``with Ablation(carrier).on(lm): ...``: the hooks are attached for the block and removed after
  it, even when the body raises;
- ``h = Ablation(carrier).attach(lm); ...; h.remove()``: the same in a notebook. The handle is a
  context manager too, and ``remove()`` may be called any number of times;
- ``evaluate(lm, prompts, intervention=Ablation(carrier))``: the library binds it to ``lm``.

``to_dict()`` describes the intervention for provenance: kind, the carrier's method, layer,
position and site, a sha256 of the vectors, the coefficient, layers and positions. Every result
computed under an intervention records it.

A carrier is a :class:`~safegeom.carriers.carrier.Carrier` (its basis or direction, and its layer)
or a plain tensor. Carriers are read by duck typing (``.vectors``, ``.layer``, ``.position``,
``.method``, ``.site``), so this module does not import the carriers package, which imports it.

Example:
    >>> import torch
    >>> from safegeom.interventions import Addition
    >>> Addition(torch.ones(4), layers=1, coeff=-1.0).to_dict()["coefficient"]
    -1.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import torch
from torch import Tensor

from safegeom.artifacts import sha256_bytes
from safegeom.errors import ConfigError, NonFiniteError
from safegeom.interventions.functions import (
    ABLATION_SITES,
    Positions,
    ablate,
    add,
    affine_edit,
)
from safegeom.models.loading import LoadedModel
from safegeom.models.positions import LayerSpec

if TYPE_CHECKING:
    from safegeom.carriers.carrier import Carrier

__all__ = [
    "Ablation",
    "Addition",
    "AffineEdit",
    "InterventionHandle",
    "vectors_hash",
]

Layers: TypeAlias = LayerSpec | str | int | Sequence[int] | None
"""A layer spec: a :class:`~safegeom.models.positions.LayerSpec`, ``"all"``, ``"2:6"``
(end-exclusive), ``"2-5"`` (inclusive), an int or a sequence of ints."""


def _is_carrier(value: Any) -> bool:
    return all(hasattr(value, name) for name in ("vectors", "layer", "method", "site"))


def _vectors_of(value: Any) -> Tensor:
    """The ``[k, d]`` float32 CPU vectors of a carrier, or of a tensor ``[d]``/``[k, d]``."""
    v = value.vectors if _is_carrier(value) else value
    v = torch.as_tensor(v).detach().cpu().float()
    return v[None] if v.dim() == 1 else v


def vectors_hash(value: Any) -> str:
    """Hex sha256 of the float32 little-endian bytes of a carrier's vectors (or a tensor's)."""
    v = _vectors_of(value).contiguous()
    return sha256_bytes(v.numpy().astype("<f4").tobytes())


def _layers_json(layers: Layers) -> Any:
    if layers is None:
        return None
    spec = getattr(layers, "spec", None)
    if spec is not None:
        return str(spec)
    if isinstance(layers, (str, int)):
        return layers
    return [int(x) for x in layers]


def _describe(kind: str, carrier: Any, coefficient: float | None, layers: Layers, positions: Any):
    info: dict[str, Any] = {"kind": kind}
    if _is_carrier(carrier):
        info["carrier"] = {
            "kind": getattr(carrier, "kind", None),
            "method": carrier.method,
            "layer": int(carrier.layer),
            "position": getattr(carrier, "position", None),
            "site": carrier.site,
        }
    else:
        info["carrier"] = {"kind": "tensor", "method": None, "layer": None, "position": None}
    v = _vectors_of(carrier)
    info["carrier"]["k"] = int(v.shape[0])
    info["carrier"]["d_model"] = int(v.shape[1])
    info["carrier"]["sha256"] = vectors_hash(carrier)
    info["coefficient"] = coefficient
    info["layers"] = _layers_json(layers)
    info["positions"] = positions
    return info


class InterventionHandle:
    """An intervention bound to a model; hooks attached until :meth:`remove`.

    A context manager: entering attaches the hooks (unless already attached), leaving removes
    them, also when the body raises. :meth:`remove` is idempotent.
    """

    def __init__(self, intervention: Any, lm: LoadedModel) -> None:
        """Bind ``intervention`` (an :class:`Ablation`, :class:`Addition` or :class:`AffineEdit`)
        to ``lm`` without attaching anything yet."""
        self.intervention = intervention
        self.lm = lm
        self._stack: ExitStack | None = None

    @property
    def attached(self) -> bool:
        """Whether the hooks are on the model now."""
        return self._stack is not None

    def attach(self) -> InterventionHandle:
        """Attach the hooks (a no-op when attached). Returns the handle itself."""
        if self._stack is None:
            stack = ExitStack()
            try:
                stack.enter_context(self.intervention.context(self.lm))
            except BaseException:
                stack.close()
                raise
            self._stack = stack
        return self

    def remove(self) -> None:
        """Remove the hooks; calling it again does nothing."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def __enter__(self) -> InterventionHandle:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def to_dict(self) -> dict[str, Any]:
        """The bound intervention's :meth:`to_dict` (JSON-ready)."""
        return self.intervention.to_dict()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"<{type(self.intervention).__name__} on {self.lm.name} ({state})>"


class _Value:
    """Shared binding methods of the intervention values."""

    def context(self, lm: LoadedModel) -> AbstractContextManager[None]:  # pragma: no cover
        """The underlying hook context manager on ``lm``."""
        raise NotImplementedError

    def on(self, lm: LoadedModel) -> InterventionHandle:
        """Bind to ``lm``: use as ``with value.on(lm): ...`` (attached inside the block only).

        Returns:
            A detached :class:`InterventionHandle`; entering it attaches the hooks.
        """
        return InterventionHandle(self, lm)

    def attach(self, lm: LoadedModel) -> InterventionHandle:
        """Attach now, for notebooks: ``h = value.attach(lm); ...; h.remove()``.

        Returns:
            The attached :class:`InterventionHandle`.
        """
        return InterventionHandle(self, lm).attach()


def _check_coefficient(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise NonFiniteError(f"{what} must be a finite number, got {value}")
    return float(value)


@dataclass(frozen=True, eq=False)
class Ablation(_Value):
    """Project a carrier's span out of the residual stream (directional ablation).

    By default at every block input and every attention and MLP output of every layer
    (Arditi et al. 2024), whatever layer the carrier was found at.
    """

    carrier: Carrier | Tensor
    """A carrier (its whole span is removed) or a direction ``[d]`` / basis ``[d, k]``."""
    layers: Layers = "all"
    """Where to ablate (a layer spec)."""
    sites: tuple[str, ...] = ABLATION_SITES
    """Sites ablated at each layer."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", tuple(self.sites))

    def basis(self) -> Tensor:
        """The vectors handed to :func:`~safegeom.interventions.ablate`: ``[d, k]`` (or ``[d]``)."""
        if _is_carrier(self.carrier):
            return self.carrier.vectors.T
        return torch.as_tensor(self.carrier)

    def context(self, lm: LoadedModel) -> AbstractContextManager[None]:
        """The hook context manager of this ablation on ``lm``."""
        return ablate(lm, self.basis(), layers=self.layers, sites=self.sites)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (kind ``ablation``, coefficient 1: the component is removed)."""
        info = _describe("ablation", self.carrier, 1.0, self.layers, "all")
        info["sites"] = list(self.sites)
        return info


@dataclass(frozen=True, eq=False)
class Addition(_Value):
    """Activation addition ``h ← h + coeff · v`` (``v`` unnormalised: a DIM direction's norm).

    ``layers=None`` means the carrier's own layer (required for a plain tensor).
    """

    carrier: Carrier | Tensor
    """A carrier (its first, unnormalised vector) or a vector ``[d]``."""
    layers: Layers = None
    """Where to add (a layer spec); default: the carrier's layer."""
    coeff: float = 1.0
    """Multiple of the vector added: +1 induces refusal with a refusal direction, -1 bypasses it."""
    positions: Positions = "all"
    """``all`` (generated tokens too), ``prompt`` (the prompt pass) or ``instruction``."""
    site: str = "resid_pre"
    """The residual site the vector is added at."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff", _check_coefficient(self.coeff, "coeff (--coeff)"))
        if self.positions not in ("all", "prompt", "instruction"):
            raise ConfigError(
                f"positions must be all, prompt or instruction, got {self.positions!r}"
            )
        if self.layers is None and not _is_carrier(self.carrier):
            raise ConfigError("Addition of a plain tensor needs layers= (a carrier has its layer)")

    def vector(self) -> Tensor:
        """The vector added (before ``coeff``)."""
        return _vectors_of(self.carrier)[0]

    def resolved_layers(self) -> Layers:
        """The layers used: ``layers``, or the carrier's layer."""
        return int(self.carrier.layer) if self.layers is None else self.layers

    def context(self, lm: LoadedModel) -> AbstractContextManager[None]:
        """The hook context manager of this addition on ``lm``."""
        return add(
            lm,
            self.vector(),
            layers=self.resolved_layers(),
            coeff=self.coeff,
            positions=self.positions,
            site=self.site,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (kind ``addition``)."""
        info = _describe(
            "addition", self.carrier, self.coeff, self.resolved_layers(), self.positions
        )
        info["site"] = self.site
        return info


@dataclass(frozen=True, eq=False)
class AffineEdit(_Value):
    """Affine concept edit ``h ← h − (h·r̂) r̂ + (μ·r̂) r̂ + α r̂`` (Marshall et al.).

    ``reference_mean`` (μ) is the mean harmless activation (``[d]`` or one row per layer);
    ``alpha`` is in units of the residual norm along r̂. ``layers=None``: the carrier's layer, or
    every layer for a plain tensor.
    """

    carrier: Carrier | Tensor
    """A carrier (its first vector) or a direction ``[d]``; normalised to r̂."""
    reference_mean: Tensor = field(default_factory=lambda: torch.zeros(0))
    """μ: ``[d]`` or ``[n_layers_selected, d]``."""
    alpha: float = 0.0
    """The refusal coordinate set on every state, relative to the reference's."""
    layers: Layers = None
    """Where to edit (a layer spec); default: the carrier's layer, or ``all`` for a tensor."""
    site: str = "resid_pre"
    """The residual site edited."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", _check_coefficient(self.alpha, "alpha (--coeff)"))
        if torch.as_tensor(self.reference_mean).numel() == 0:
            raise ConfigError("AffineEdit needs reference_mean= (mean harmless activation)")

    def resolved_layers(self) -> Layers:
        """The layers used: ``layers``, the carrier's layer, or ``all``."""
        if self.layers is not None:
            return self.layers
        return int(self.carrier.layer) if _is_carrier(self.carrier) else "all"

    def context(self, lm: LoadedModel) -> AbstractContextManager[None]:
        """The hook context manager of this edit on ``lm``."""
        return affine_edit(
            lm,
            _vectors_of(self.carrier)[0],
            self.reference_mean,
            alpha=self.alpha,
            layers=self.resolved_layers(),
            site=self.site,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (kind ``affine_edit``; coefficient: ``alpha``)."""
        info = _describe("affine_edit", self.carrier, self.alpha, self.resolved_layers(), "all")
        info["site"] = self.site
        info["reference_mean_sha256"] = vectors_hash(self.reference_mean)
        return info
