"""Every carrier of the audit's reference refitted on many resamples of the captured prompts.

:func:`refit_resamples` gives, at one layer, each carrier's vectors on every resample
(:class:`~safegeom.audit.resample.Draws`): a diff-in-means direction and the cheap cone by the
batched fits of :mod:`~safegeom.audit.resample`, any other registered carrier type by its own fit
function, one resample at a time. The batched fits are first checked against the carrier's own fit
on the full sample (the point estimate the row reports); a type they do not reproduce is refitted
by its fit function.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from safegeom.audit.activations import CarrierActivations, layer_inputs
from safegeom.audit.resample import Draws, cone_bases, directions
from safegeom.carriers.fit import Fitted
from safegeom.carriers.registry import ClassActivations, carrier_type
from safegeom.errors import SafegeomError

__all__ = ["Resampled", "refit_resamples"]

_AGREE = 1e-8
"""Relative agreement a batched fit of the full sample must reach with the carrier's own fit."""


@dataclass(frozen=True)
class Resampled:
    """The carriers of one layer refitted on ``R`` resamples (float64; NaN where undefined)."""

    vectors: Mapping[str, Tensor]
    """Carrier name → ``[R, d]`` (a direction) or ``[R, k, d]`` (orthonormal rows)."""
    ranks: Mapping[str, Tensor]
    """Carrier name → ``[R]`` effective rank, for the carriers whose fit measures one."""


def _resample(inputs: ClassActivations, draws: Draws, i: int) -> ClassActivations:
    """Resample ``i``'s prompts (repeated as drawn) as a fit input."""
    rows_h = torch.repeat_interleave(torch.arange(len(inputs.harmful)), draws.harmful[i].long())
    rows_s = torch.repeat_interleave(torch.arange(len(inputs.harmless)), draws.harmless[i].long())
    return ClassActivations(
        harmful=inputs.harmful[rows_h],
        harmless=inputs.harmless[rows_s],
        positions=inputs.positions,
        k=inputs.k,
        noise=inputs.noise,
    )


def _one_by_one(
    name: str, inputs: ClassActivations, draws: Draws, point: Fitted
) -> tuple[Tensor, Tensor | None]:
    """Every resample fitted by the registered type's own fit function (NaN where undefined)."""
    fit = carrier_type(name).fit
    vectors = torch.full((draws.size, *point.vectors.shape), float("nan"), dtype=torch.float64)
    has_rank = "effective_rank" in point.scores
    ranks = torch.full((draws.size,), float("nan"), dtype=torch.float64) if has_rank else None
    for i in range(draws.size):
        try:
            fitted = fit(_resample(inputs, draws, i))
        except SafegeomError:
            continue
        vectors[i] = fitted.vectors.double()
        if ranks is not None:
            ranks[i] = fitted.scores.get("effective_rank", float("nan"))
    return vectors, ranks


def _full(inputs: ClassActivations) -> Draws:
    """The full sample as one resample (every prompt once)."""
    ones = (
        torch.ones(1, len(inputs.harmful), dtype=torch.float64),
        torch.ones(1, len(inputs.harmless), dtype=torch.float64),
    )
    return Draws(*ones)


def _same_span(a: Tensor, b: Tensor) -> bool:
    """Whether two orthonormal row sets span the same subspace (projectors agree)."""
    return bool(torch.allclose(a.T @ a, b.T @ b, atol=_AGREE, rtol=0.0))


def _batched(
    inputs: ClassActivations, draws: Draws, point: Fitted
) -> tuple[Tensor, Tensor | None] | None:
    """The batched fit of a direction or a cheap cone, or ``None`` where it does not reproduce
    the point estimate on the full sample (another fit function)."""
    vectors = point.vectors.double()
    if vectors.dim() == 1 and len(inputs.positions) == 1:
        harmful, harmless = inputs.single()
        full = directions(_full(inputs), harmful, harmless)[0]
        tol = _AGREE * float(vectors.norm())
        if not torch.allclose(full, vectors, atol=tol, rtol=0.0):
            return None
        return directions(draws, harmful, harmless), None
    if vectors.dim() == 2 and inputs.k == vectors.shape[0]:
        bases, ranks = cone_bases(
            _full(inputs),
            inputs.harmful,
            inputs.harmless,
            inputs.k,
            positions=inputs.positions,
            noise=inputs.noise,
        )
        rank = point.scores.get("effective_rank")
        if not bool(torch.isfinite(bases).all()) or not _same_span(bases[0], vectors):
            return None
        if rank is not None and abs(float(ranks[0]) - rank) > _AGREE * max(rank, 1.0):
            return None
        bases, ranks = cone_bases(
            draws,
            inputs.harmful,
            inputs.harmless,
            inputs.k,
            positions=inputs.positions,
            noise=inputs.noise,
        )
        return bases, ranks if rank is not None else None
    return None


def refit_resamples(
    reference: Any,
    acts: CarrierActivations,
    layer: int,
    draws: Draws,
    points: Mapping[str, Fitted | None],
) -> Resampled:
    """Every carrier of ``reference`` with a point estimate at ``layer`` refitted on ``draws``.

    ``reference`` is the audit's :class:`~safegeom.audit.reference.Reference` (each carrier's
    position and dimension); ``points`` the carriers fitted on all prompts at this layer (``None``:
    undefined, no resamples).

    Returns:
        :class:`Resampled` of the carriers whose point estimate exists.
    """
    vectors: dict[str, Tensor] = {}
    ranks: dict[str, Tensor] = {}
    for name, carrier in reference.carriers.items():
        point = points.get(name)
        if point is None:
            continue
        inputs = layer_inputs(acts, layer, carrier.position, carrier.k)
        result = _batched(inputs, draws, point)
        if result is None:
            result = _one_by_one(name, inputs, draws, point)
        vectors[name] = result[0]
        if result[1] is not None:
            ranks[name] = result[1]
    return Resampled(vectors=vectors, ranks=ranks)
