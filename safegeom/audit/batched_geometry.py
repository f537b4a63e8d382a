"""The geometry statistics of :mod:`safegeom.geometry` over a batch of resampled carriers.

Each function takes ``R`` carriers at once (float64) and returns ``R`` values, equal to the
single-carrier function of :mod:`safegeom.geometry` up to float rounding; a resample whose carrier
is undefined (NaN rows) gives NaN.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "cohens_d",
    "cosines",
    "coupling",
    "principal_angles",
]


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def cosines(base: Float[Tensor, " d"], own: Float[Tensor, "R d"]) -> Float[Tensor, " R"]:
    """``cos(base, own_i)`` of a fixed direction with every resampled one, in [-1, 1].

    With each direction its own sign reference (as the audit's drift), ``1 − cos`` is
    :func:`safegeom.geometry.direction_drift`.
    """
    return (_unit(own.double()) @ _unit(base.double())).clamp(-1.0, 1.0)


def principal_angles(base: Tensor, own: Float[Tensor, "R j d"]) -> Tensor:
    """Principal angles (radians, ascending, ``[R, min(k, j)]``) between orthonormal bases:
    ``base`` one fixed ``[k, d]`` or one per resample ``[R, k, d]``, against every resampled
    ``own``, as :func:`safegeom.geometry.principal_angles` computes them (cosines from
    ``base · ownᵀ``, sines from the residual where cos² ≥ ½)."""
    b = own.double()
    a = base.double()
    a = a[None].expand(b.shape[0], -1, -1) if a.dim() == 2 else a
    if a.shape[1] < b.shape[1]:  # the residual is taken of the smaller basis
        a, b = b, a
    c = a @ b.transpose(1, 2)  # [R, ka, kb], ka ≥ kb
    cos = torch.linalg.svdvals(c).clamp(0.0, 1.0)  # descending
    resid = b - c.transpose(1, 2) @ a  # [R, kb, d]: b projected off span(a)
    sin = torch.linalg.svdvals(resid).clamp(0.0, 1.0).sort(dim=1).values  # ascending
    theta = torch.where(cos**2 >= 0.5, torch.arcsin(sin), torch.arccos(cos))
    return theta.clamp(0.0, torch.pi / 2).sort(dim=1).values


def coupling(a: Float[Tensor, "R d"], b: Tensor) -> Float[Tensor, " R"]:
    """:func:`safegeom.geometry.coupling` of every resample: ``|cos(a_i, b_i)|`` when ``b`` is a
    batch of directions ``[R, d]``, the mean cos² of the principal angles between ``a_i`` and the
    orthonormal rows ``b_i`` when ``b`` is ``[R, k, d]`` (one angle: ``‖b_i â_i‖²``), in [0, 1]."""
    u = _unit(a.double())
    if b.dim() == 2:
        return (u * _unit(b.double())).sum(-1).abs().clamp(0.0, 1.0)
    cos = torch.linalg.svdvals(u[:, None, :] @ b.double().transpose(1, 2))
    return (cos**2).mean(1).clamp(0.0, 1.0)


def cohens_d(
    harmful: Float[Tensor, "... n k"],
    harmless: Float[Tensor, "... m k"],
    counts_harmful: Float[Tensor, "R n"],
    counts_harmless: Float[Tensor, "R m"],
) -> Float[Tensor, "R k"]:
    """Cohen's d (pooled sd, ddof=1) of each coordinate, harmful vs harmless, in every resample:
    projections ``[n, k]`` (the same for every resample) or ``[R, n, k]`` (a resampled basis),
    weighted by how often each prompt is in the resample (dimensionless; ±inf or NaN where the
    pooled sd is 0, as :func:`safegeom.geometry.coordinate_statistics`)."""

    def moments(x: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        size = c.sum(1)[:, None]  # [R, 1]
        w = c[:, :, None]  # [R, n, 1]
        mean = (w * x).sum(1) / size
        var = (w * (x - mean[:, None]) ** 2).sum(1) / (size - 1)
        return mean, var, size

    m1, v1, n1 = moments(harmful.double(), counts_harmful.double())
    m2, v2, n2 = moments(harmless.double(), counts_harmless.double())
    pooled = torch.sqrt(((n1 - 1) * v1 + (n2 - 1) * v2) / (n1 + n2 - 2))
    return (m1 - m2) / pooled
