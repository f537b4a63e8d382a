"""The audit's one capture pass over the carrier prompts, and every registered carrier refitted
from it.

:func:`capture_carriers` captures ``resid_pre`` of the carrier prompts at every audited layer,
positions ``t_inst`` and every ``t_post`` token (float32 storage, float64 arithmetic), as
:class:`CarrierActivations`. :func:`refit` fits one registered carrier type
(:data:`~safegeom.carriers.registry.CARRIER_TYPES`) at one layer from them, so the base measured
against itself gives drift 0, cosine 1 and principal angles 0 exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from safegeom.activations import CaptureConfig, capture
from safegeom.audit.config import AuditConfig
from safegeom.carriers.fit import Fitted
from safegeom.carriers.registry import CAPTURED, ClassActivations, carrier_type, read_positions
from safegeom.errors import SafegeomError
from safegeom.models.loading import LoadedModel
from safegeom.prompts import PromptSet, combine_prompts

__all__ = [
    "NOISE_FLOOR",
    "CarrierActivations",
    "capture_carriers",
    "carrier_prompts",
    "layer_inputs",
    "live",
    "refit",
]

SITE = "resid_pre"
POSITIONS = CAPTURED

NOISE_FLOOR = 1e-7
"""Vectors whose norm is at most this fraction of the RMS activation norm are float noise (no
direction: e.g. ``t_post`` at the embedding layer, where every prompt has the same tokens)."""


def carrier_prompts(config: AuditConfig) -> tuple[PromptSet, PromptSet]:
    """The carrier prompts: the first ``n_per_class`` of the combined harmful and harmless sets.

    Returns:
        ``(harmful, harmless)`` prompt sets.
    """
    harmful = combine_prompts(config.harmful).take(config.n_per_class)
    harmless = combine_prompts(config.harmless).take(config.n_per_class)
    return harmful, harmless


@dataclass(frozen=True)
class CarrierActivations:
    """Per-prompt ``resid_pre`` activations of the carrier prompts, float64 ``[n, layer, pos, d]``."""

    harmful: Float[Tensor, "n layer pos d"]
    harmless: Float[Tensor, "m layer pos d"]
    layers: tuple[int, ...]
    positions: tuple[str, ...]
    name: str
    """The carrier sets' name (the ``prompts`` column of geometry and causal rows)."""

    def index(self, layer: int, position: str) -> tuple[int, int]:
        """Indices of ``layer`` and ``position`` in the tensors.

        Raises:
            SafegeomError: the layer or position was not captured.
        """
        if layer not in self.layers or position not in self.positions:
            raise SafegeomError(
                f"layer {layer} / position {position!r} was not captured (layers {self.layers}, "
                f"positions {self.positions})"
            )
        return self.layers.index(layer), self.positions.index(position)

    def at(self, layer: int, position: str) -> tuple[Tensor, Tensor]:
        """``(harmful [n, d], harmless [m, d])`` at one layer and position."""
        j, p = self.index(layer, position)
        return self.harmful[:, j, p], self.harmless[:, j, p]

    def diff(self, position: str) -> Float[Tensor, "layer d"]:
        """Diff-in-means ``mean_harmful − mean_harmless`` at ``position``, every layer (float64)."""
        p = self.positions.index(position)
        return self.harmful[:, :, p].mean(0) - self.harmless[:, :, p].mean(0)

    def scale(self, layer: int) -> float:
        """Root-mean-square activation norm at ``layer`` (the size float noise is measured by)."""
        j = self.layers.index(layer)
        both = torch.cat([self.harmful[:, j], self.harmless[:, j]])
        return float(both.norm(dim=-1).pow(2).mean().sqrt())

    @property
    def post(self) -> tuple[int, ...]:
        """Indices of the ``t_post`` positions, in template order."""
        return tuple(i for i, p in enumerate(self.positions) if p.startswith("t_post"))


def capture_carriers(
    lm: LoadedModel,
    config: AuditConfig,
    layers: Sequence[int],
    *,
    progress: bool = False,
) -> CarrierActivations:
    """One capture pass over both carrier sets (harmful then harmless, as one prompt list).

    Returns:
        The :class:`CarrierActivations` at ``layers`` and positions ``t_inst``, ``t_post[...]``.
    """
    harmful, harmless = carrier_prompts(config)
    both = combine_prompts([harmful, harmless])
    acts = capture(
        lm,
        both,
        CaptureConfig(
            layers=list(layers),
            positions=POSITIONS,
            dtype=torch.float32,
            system=config.system,
            batch_size=config.batch_size,
        ),
        progress=progress,
    )
    data = acts[SITE].double()
    n = len(harmful)
    return CarrierActivations(
        harmful=data[:n],
        harmless=data[n:],
        layers=tuple(int(x) for x in acts.layers),
        positions=tuple(acts.positions),
        name=f"{harmful.name} vs {harmless.name}",
    )


def live(v: Tensor, scale: float) -> bool:
    """Whether ``v`` is more than float noise against activations of size ``scale``."""
    return bool(v.norm() > NOISE_FLOOR * max(scale, 1e-300))


def layer_inputs(
    acts: CarrierActivations, layer: int, position: str, k: int = 1
) -> ClassActivations:
    """The fit input of a carrier reading ``position`` at ``layer`` (see
    :func:`~safegeom.carriers.registry.read_positions`), its noise floor set by the layer's RMS
    activation norm.

    Returns:
        :class:`~safegeom.carriers.registry.ClassActivations` asking for ``k`` dimensions.

    Raises:
        SafegeomError: the layer or position was not captured.
    """
    if layer not in acts.layers:
        raise SafegeomError(
            f"layer {layer} was not captured (layers {acts.layers}); capture it with the others"
        )
    j = acts.layers.index(layer)
    return read_positions(
        acts.harmful[:, j],
        acts.harmless[:, j],
        acts.positions,
        position,
        k=k,
        noise=NOISE_FLOOR * max(acts.scale(layer), 1e-300),
    )


def refit(
    acts: CarrierActivations, name: str, layer: int, position: str, k: int = 1
) -> Fitted | None:
    """The registered carrier type ``name`` fitted at ``layer`` from these activations.

    Returns:
        The :class:`~safegeom.carriers.fit.Fitted` carrier, or ``None`` where it is undefined
        (e.g. a cone whose sources are float noise or span fewer than ``k`` dimensions).

    Raises:
        NotFoundError: no type of that name is registered.
        SafegeomError: the layer or position was not captured.
    """
    ctype = carrier_type(name)
    inputs = layer_inputs(acts, layer, position, k)
    try:
        return ctype.fit(inputs)
    except SafegeomError:
        return None
