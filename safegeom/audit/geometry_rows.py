"""The geometry rows of one checkpoint: drift, principal angles, coupling, effective rank,
coordinate statistics and projection separation of every carrier in the audit's reference.

Every carrier is refitted from the same per-prompt activations
(:mod:`~safegeom.audit.activations`) by its registered fit function
(:data:`~safegeom.carriers.registry.CARRIER_TYPES`), so the base measured against itself gives drift
0, cosine 1 and principal angles 0 exactly. What a carrier gets depends on its shape: a direction
(one vector per layer, e.g. refusal and harmfulness) drift, cosine to base and projection
separation; a subspace (``k`` rows per layer, e.g. the cone) principal angles, Grassmann distance,
effective rank (when its fit measures one) and coordinate statistics. The couplings pair named
carriers (:data:`COUPLINGS`).

Every geometry row gets a bootstrap CI over the carrier prompts
(:mod:`~safegeom.audit.geometry_ci`), and the drift, cosine, angle and coupling rows get noise-floor
rows of their own (:mod:`~safegeom.audit.floors`); neither changes a row's value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from safegeom.audit.activations import (
    CarrierActivations,
    capture_carriers,
    carrier_prompts,
    live,
    refit,
)
from safegeom.audit.config import AuditConfig
from safegeom.audit.floors import floor_rows
from safegeom.audit.geometry_ci import COUPLINGS, attach_intervals, geometry_samples, read_at
from safegeom.audit.resample import bootstrap_draws
from safegeom.carriers.fit import Fitted
from safegeom.geometry import (
    coordinate_imbalance,
    coordinate_statistics,
    coupling,
    direction_drift,
    principal_angles,
)

__all__ = [
    "COUPLINGS",
    "CarrierActivations",
    "capture_carriers",
    "carrier_prompts",
    "cohens_d",
    "geometry_rows",
    "projection_separation",
]


def cohens_d(a: np.ndarray, b: np.ndarray, floor: float = 0.0) -> float:
    """Cohen's d of two samples with the pooled standard deviation (ddof=1).

    Where the pooled sd is at most ``floor`` (float noise: the projection no longer varies) the
    separation is 0 if the means also agree within ``floor``, else ±inf.

    Returns:
        The dimensionless d.
    """
    n1, n2 = len(a), len(b)
    pooled = np.sqrt(((n1 - 1) * a.var(ddof=1) + (n2 - 1) * b.var(ddof=1)) / (n1 + n2 - 2))
    gap = float(a.mean() - b.mean())
    if pooled <= floor:
        return 0.0 if abs(gap) <= floor else float(np.sign(gap) * np.inf)
    return float(gap / pooled)


NOISE = 1e-5
"""Relative size of float32 noise against the RMS activation norm: projections with a spread
below ``NOISE · rms`` (e.g. on a direction orthogonalised out of the weights) count as constant."""


def projection_separation(
    harmful: Tensor,
    harmless: Tensor,
    direction: Tensor,
    *,
    n_resamples: int,
    seed: int,
    scale: float,
) -> tuple[float, float, float]:
    """Cohen's d of the projections ``⟨x, r̂⟩``, harmful vs harmless, with a stratified percentile
    bootstrap CI (each class resampled on its own, numpy ``default_rng(seed)``); ``scale`` is the
    RMS activation norm, so that spreads below ``NOISE · scale`` count as none (d = 0).

    Returns:
        ``(d, ci_low, ci_high)``.
    """
    u = direction.double() / direction.double().norm()
    a, b = (harmful.double() @ u).numpy(), (harmless.double() @ u).numpy()
    floor = NOISE * scale
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, len(a), size=(n_resamples, len(a)))
    ib = rng.integers(0, len(b), size=(n_resamples, len(b)))
    stats = np.array([cohens_d(a[i], b[j], floor) for i, j in zip(ia, ib, strict=True)])
    stats = stats[np.isfinite(stats)]
    low, high = np.percentile(stats, [2.5, 97.5]) if len(stats) else (np.nan, np.nan)
    return cohens_d(a, b, floor), float(low), float(high)


def _row(metric: str, value: float, **fields: Any) -> dict[str, Any]:
    return {"metric": metric, "value": float(value), **fields}


def direction_rows(
    carrier: str, base: Tensor, own: Tensor, acts: CarrierActivations, layers: Sequence[int]
) -> list[dict[str, Any]]:
    """Drift and cosine to base of one direction carrier at every layer: ``base`` and ``own`` are
    ``[layer, d]`` (each its own sign reference, docs/methods.md §5). Layers where either is zero up
    to float noise (no direction, e.g. ``t_post`` at the embedding layer) get no row.

    Returns:
        ``direction_drift`` and ``cosine_to_base`` rows (source ``reextracted``).
    """
    rows = []
    n = len(acts.harmful) + len(acts.harmless)
    for j, layer in enumerate(layers):
        scale = acts.scale(layer)
        if not (live(base[j], scale) and live(own[j], scale)):
            continue
        drift = direction_drift(base[j], own[j], reference=(base[j], own[j]))
        common = {
            "layer": layer,
            "carrier": carrier,
            "source": "reextracted",
            "prompts": acts.name,
            "n": n,
        }
        rows.append(_row("direction_drift", drift, **common))
        rows.append(_row("cosine_to_base", 1.0 - drift, **common))
    return rows


def coordinate_rows(
    basis: Tensor,
    harmful: Tensor,
    harmless: Tensor,
    source: str,
    layer: int,
    prompts: str,
    carrier: str = "cone",
) -> list[dict[str, Any]]:
    """Per-basis-vector Cohen's d (``coordinate_separation``, carrier ``NAME[j]``) and the
    imbalance (carrier ``NAME``) of a subspace carrier on activations at one layer.

    Returns:
        The rows (``n`` = prompts of both classes).
    """
    stats = coordinate_statistics(basis, harmful, harmless)
    n = len(harmful) + len(harmless)
    common = {"layer": layer, "source": source, "prompts": prompts, "n": n}
    rows = [
        _row("coordinate_separation", sep, carrier=f"{carrier}[{j}]", **common)
        for j, sep in enumerate(stats["separation"])
    ]
    if np.isfinite(stats["separation"]).all():
        value = coordinate_imbalance(stats)
        rows.append(_row("coordinate_imbalance", value, carrier=carrier, **common))
    return rows


def _subspace_rows(
    name: str, fit: Fitted | None, base: Tensor, common: dict[str, Any]
) -> list[dict[str, Any]]:
    """Principal angles to the base's subspace and effective rank of one refitted subspace."""
    if fit is None:
        return []
    rows = []
    basis = fit.vectors
    if bool(base.abs().sum() > 0):
        theta = principal_angles(base, basis, hidden_size=basis.shape[-1])
        rows.append(_row("principal_angle_max", float(np.max(theta)), carrier=name, **common))
        distance = float(np.sqrt(np.sum(theta**2)))
        rows.append(_row("grassmann_distance", distance, carrier=name, **common))
    if "effective_rank" in fit.scores:
        rows.append(_row("effective_rank", fit.scores["effective_rank"], carrier=name, **common))
    return rows


def _coupling(a: Fitted | None, b: Fitted | None, scale: float) -> float | None:
    """|cos| of direction ``a`` with direction ``b``, or its subspace coupling with subspace ``b``;
    ``None`` where either is missing or a direction is float noise."""
    if a is None or b is None or not live(a.vectors, scale):
        return None
    if b.vectors.dim() == 1:
        return coupling(a.vectors, b.vectors) if live(b.vectors, scale) else None
    return coupling(a.vectors, b.vectors, hidden_size=b.vectors.shape[-1])


def geometry_rows(
    reference: Any, acts: CarrierActivations, config: AuditConfig, layers: Sequence[int]
) -> tuple[list[dict[str, Any]], dict[str, Tensor | None]]:
    """The geometry family on one checkpoint's carrier activations.

    ``reference`` is the :class:`~safegeom.audit.reference.Reference` (typed loosely to keep this
    module free of it). Every carrier of the reference is refitted at every layer in ``layers``
    and at r₀'s, at the base carrier's position and dimension. Per layer: drift and cosine to base
    of every direction (refusal at r₀'s position, harmfulness at ``t_inst``), principal_angle_max,
    grassmann_distance and effective rank of every subspace (the cone), then the couplings
    (:data:`COUPLINGS`: ``hr``, |cos(h_t, r_t)|; ``hr-cone``, mean cos² between h_t and B_t). At
    r₀'s layer: coordinate statistics of every subspace, the base's (``fixed``) and the
    checkpoint's (``reextracted``), at ``t_post[-1]``; projection separation on every direction,
    the base's and the checkpoint's. Every row gets a bootstrap CI over the carrier prompts
    (``config.n_resamples`` draws from ``config.seed``), and drift, cosine, angles and couplings
    get ``floor`` rows (:mod:`~safegeom.audit.floors`).

    Returns:
        ``(rows, carriers)`` with ``carriers`` every refitted carrier's float64 vectors at r₀'s
        layer by name (``refusal``: r_t, ``harmfulness``: h_t, ``cone``: B_t ``[k, d]``; ``None``
        where undefined).
    """
    name, n = acts.name, len(acts.harmful) + len(acts.harmless)
    at = reference.refusal.layer
    wanted = [*layers, *([] if at in layers else [at])]
    own = {
        cname: {layer: refit(acts, cname, layer, c.position, c.k) for layer in wanted}
        for cname, c in reference.carriers.items()
    }
    directions = [c for c in reference.carriers if reference.layer_vectors[c].dim() == 2]
    subspaces = [c for c in reference.carriers if reference.layer_vectors[c].dim() == 3]
    pick = [reference.layer_index(x) for x in layers]
    rows: list[dict[str, Any]] = []
    for cname in directions:
        base = reference.layer_vectors[cname][pick]
        mine = torch.stack([_vector(own[cname][layer], base.shape[-1]) for layer in layers])
        rows += direction_rows(cname, base, mine, acts, layers)
    for layer in layers:
        common = {"layer": layer, "source": "reextracted", "prompts": name, "n": n}
        for cname in subspaces:
            base = reference.layer_vectors[cname][reference.layer_index(layer)]
            rows += _subspace_rows(cname, own[cname][layer], base, common)
        for label, a, b in COUPLINGS:
            if a in own and b in own:
                value = _coupling(own[a][layer], own[b][layer], acts.scale(layer))
                if value is not None:
                    rows.append(_row("hr_coupling", value, carrier=label, **common))
    for cname in subspaces:
        carrier = reference.carriers[cname]
        harmful, harmless = acts.at(at, read_at(carrier.position, acts))
        fixed = carrier.vectors.double()
        rows += coordinate_rows(fixed, harmful, harmless, "fixed", at, name, cname)
        mine = own[cname][at]
        if mine is not None:
            mine_rows = coordinate_rows(
                mine.vectors, harmful, harmless, "reextracted", at, name, cname
            )
            rows += _informative(mine_rows, mine, read_at(carrier.position, acts), cname)
    for cname in directions:
        rows += _separation_rows(cname, reference.carriers[cname], own[cname][at], acts, config, at)
    generator = torch.Generator().manual_seed(config.seed)
    draws = bootstrap_draws(len(acts.harmful), len(acts.harmless), config.n_resamples, generator)
    rows = attach_intervals(rows, geometry_samples(reference, acts, layers, own, draws))
    rows += floor_rows(reference, acts, own, rows, n_resamples=config.n_resamples, seed=config.seed)
    return rows, {
        cname: None if fits[at] is None else fits[at].vectors for cname, fits in own.items()
    }


def _informative(
    rows: list[dict[str, Any]], fit: Fitted, position: str, cname: str
) -> list[dict[str, Any]]:
    """A re-extracted subspace's coordinate rows without ``NAME[j]``, j ≥ 1, where its first basis
    vector is the diff-in-means at the position read (the others are orthogonal to the class mean
    difference by construction: d = 0, no information; see :mod:`~safegeom.audit.schema`)."""
    sources = list(fit.extra.get("raw_vectors", ()))
    if not sources or sources[0] != position:
        return rows
    first = f"{cname}[0]"
    return [r for r in rows if r["metric"] != "coordinate_separation" or r["carrier"] == first]


def _vector(fit: Fitted | None, d: int) -> Tensor:
    """A refitted direction's vector, zeros where it is undefined (then it gets no row)."""
    return torch.zeros(d, dtype=torch.float64) if fit is None else fit.vectors


def _separation_rows(
    cname: str,
    carrier: Any,
    mine: Fitted | None,
    acts: CarrierActivations,
    config: AuditConfig,
    at: int,
) -> list[dict[str, Any]]:
    """Projection separation on the base's direction (``fixed``) and the checkpoint's
    (``reextracted``) at r₀'s layer, at the carrier's position."""
    harmful, harmless = acts.at(at, carrier.position)
    scale = acts.scale(at)
    n = len(acts.harmful) + len(acts.harmless)
    rows = []
    for source, vector in (
        ("fixed", carrier.direction),
        ("reextracted", None if mine is None else mine.vectors),
    ):
        if vector is None or not live(vector.double(), scale):
            continue
        d, low, high = projection_separation(
            harmful,
            harmless,
            vector,
            n_resamples=config.n_resamples,
            seed=config.seed,
            scale=scale,
        )
        rows.append(
            _row(
                "projection_separation",
                d,
                layer=at,
                carrier=cname,
                source=source,
                prompts=acts.name,
                ci_low=low,
                ci_high=high,
                n=n,
            )
        )
    return rows
