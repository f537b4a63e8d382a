"""Bootstrap confidence intervals of the geometry rows (drift, cosine, principal angles, Grassmann
distance, effective rank, coupling, coordinate statistics).

The carrier prompts of each class are resampled with replacement (``config.n_resamples`` draws,
seeded by ``config.seed``; :func:`~safegeom.audit.resample.bootstrap_draws`); every carrier is
refitted from the activations already captured (:mod:`~safegeom.audit.refits`; no forward pass)
and the row's statistic recomputed on each draw, in float64. The base's carriers (the ``fixed``
side of a drift, the basis of ``fixed`` coordinate statistics) are held fixed: the CI is the
sampling uncertainty of the checkpoint's side; the noise of re-extracting a carrier at all is what
the floor rows measure (:mod:`~safegeom.audit.floors`). Every draw is shared by all layers and
carriers, so a coupling's CI is paired. The interval is the 2.5–97.5 percentile interval, widened
to contain the row's value (:func:`~safegeom.audit.resample.percentile_interval`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from safegeom.audit.activations import CarrierActivations
from safegeom.audit.batched_geometry import cohens_d, cosines, coupling, principal_angles
from safegeom.audit.refits import Resampled, refit_resamples
from safegeom.audit.resample import Draws, percentile_interval
from safegeom.carriers.fit import Fitted

__all__ = ["COUPLINGS", "Key", "attach_intervals", "geometry_samples", "read_at"]

COUPLINGS = (("hr", "harmfulness", "refusal"), ("hr-cone", "harmfulness", "cone"))
"""``(carrier label, direction, direction or subspace)``: the couplings written per layer, where
the reference holds both carriers."""

Key = tuple[str, int, str, str]
"""A geometry row's identity: ``(metric, layer, carrier, source)``."""


def read_at(position: str, acts: CarrierActivations) -> str:
    """The one position a carrier's coordinates are read at: ``t_post[-1]`` for ``t_post``."""
    return acts.positions[acts.post[-1]] if position == "t_post" else position


def _layer_samples(reference: Any, layer: int, res: Resampled, out: dict[Key, Tensor]) -> None:
    """Drift, cosine, angles, Grassmann distance, effective rank and couplings at one layer."""
    for name, vectors in res.vectors.items():
        base = reference.layer_vectors[name][reference.layer_index(layer)].double()
        if vectors.dim() == 2:
            cos = cosines(base, vectors)
            out["direction_drift", layer, name, "reextracted"] = 1.0 - cos
            out["cosine_to_base", layer, name, "reextracted"] = cos
        elif bool(base.abs().sum() > 0):
            theta = principal_angles(base, vectors)
            out["principal_angle_max", layer, name, "reextracted"] = theta.max(1).values
            out["grassmann_distance", layer, name, "reextracted"] = theta.pow(2).sum(1).sqrt()
        if name in res.ranks:
            out["effective_rank", layer, name, "reextracted"] = res.ranks[name]
    for label, a, b in COUPLINGS:
        if a in res.vectors and b in res.vectors:
            out["hr_coupling", layer, label, "reextracted"] = coupling(
                res.vectors[a], res.vectors[b]
            )


def _coordinate_samples(
    name: str,
    basis: Tensor,
    source: str,
    projections: tuple[Tensor, Tensor],
    draws: Draws,
    layer: int,
    out: dict[Key, Tensor],
) -> None:
    """Per-coordinate Cohen's d and its imbalance (std of |d| across the basis) on every draw."""
    d = cohens_d(*projections, draws.harmful, draws.harmless)  # [R, k]
    for j in range(basis.shape[-2]):
        out["coordinate_separation", layer, f"{name}[{j}]", source] = d[:, j]
    out["coordinate_imbalance", layer, name, source] = d.abs().std(dim=1, unbiased=False)


def geometry_samples(
    reference: Any,
    acts: CarrierActivations,
    layers: Sequence[int],
    own: Mapping[str, Mapping[int, Fitted | None]],
    draws: Draws,
) -> dict[Key, Tensor]:
    """Every geometry statistic on every bootstrap draw.

    ``reference`` is the audit's :class:`~safegeom.audit.reference.Reference`; ``own`` the
    checkpoint's carriers fitted on all prompts (name → layer → fit) at ``layers`` and r₀'s layer.

    Returns:
        :data:`Key` → ``[R]`` float64 values (NaN where a draw's carrier is undefined), for the
        per-layer statistics at ``layers`` and the coordinate statistics at r₀'s layer.
    """
    at = reference.refusal.layer
    out: dict[Key, Tensor] = {}
    resampled: dict[int, Resampled] = {}
    for layer in dict.fromkeys([*layers, at]):
        points = {name: fits[layer] for name, fits in own.items()}
        resampled[layer] = refit_resamples(reference, acts, layer, draws, points)
        if layer in layers:
            _layer_samples(reference, layer, resampled[layer], out)
    for name in reference.carriers:
        if reference.layer_vectors[name].dim() != 3:
            continue
        carrier = reference.carriers[name]
        harmful, harmless = acts.at(at, read_at(carrier.position, acts))
        fixed = carrier.vectors.double()
        fixed = fixed / fixed.norm(dim=-1, keepdim=True)
        projections = (harmful @ fixed.T, harmless @ fixed.T)
        _coordinate_samples(name, fixed, "fixed", projections, draws, at, out)
        bases, point = resampled[at].vectors.get(name), own[name][at]
        if bases is None or point is None:
            continue
        # a basis vector's sign is arbitrary: align each draw's rows with the point estimate's
        signs = torch.sign((bases * point.vectors.double()[None]).sum(-1, keepdim=True))
        bases = bases * torch.where(signs == 0, 1.0, signs)
        projections = (
            torch.einsum("nd,rkd->rnk", harmful.double(), bases),
            torch.einsum("nd,rkd->rnk", harmless.double(), bases),
        )
        _coordinate_samples(name, bases, "reextracted", projections, draws, at, out)
    return out


def attach_intervals(
    rows: Sequence[dict[str, Any]], samples: Mapping[Key, Tensor]
) -> list[dict[str, Any]]:
    """The rows with ``ci_low``/``ci_high`` set from their statistic's bootstrap values, where a
    row has none yet and its :data:`Key` has samples (values unchanged).

    Returns:
        New row dicts, in the same order.
    """
    out = []
    for row in rows:
        key = (row["metric"], row.get("layer"), row.get("carrier"), row.get("source"))
        if row.get("ci_low") is None and key in samples:
            low, high = percentile_interval(samples[key], row["value"])
            row = {**row, "ci_low": low, "ci_high": high}
        out.append(row)
    return out
