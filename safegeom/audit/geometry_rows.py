"""The audit's one capture pass over the carrier prompts, the carriers re-extracted from it, and
the geometry rows (drift, principal angles, coupling, effective rank, coordinate statistics,
projection separation).

Every carrier here is extracted from the same per-prompt activations
(:class:`CarrierActivations`: ``resid_pre`` at every audited layer, positions ``t_inst`` and every
``t_post`` token, float32 storage, float64 arithmetic), so the base measured against itself gives
drift 0, cosine 1 and principal angles 0 exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from safegeom.audit.config import AuditConfig
from safegeom.capture import capture
from safegeom.carriers.cones import gram_schmidt
from safegeom.errors import SafegeomError
from safegeom.geometry import (
    coordinate_imbalance,
    coordinate_statistics,
    coupling,
    direction_drift,
    effective_rank,
    principal_angles,
)
from safegeom.models.loading import LoadedModel
from safegeom.prompts import PromptSet, combine_prompts

__all__ = [
    "CarrierActivations",
    "capture_carriers",
    "carrier_prompts",
    "cohens_d",
    "cone_at",
    "geometry_rows",
    "projection_separation",
]

SITE = "resid_pre"
POSITIONS = "t_inst,t_post"


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
        lm, both, layers=list(layers), positions=POSITIONS, dtype=torch.float32,
        system=config.system, batch_size=config.batch_size, progress=progress,
    )  # fmt: skip
    data = acts[SITE].double()
    n = len(harmful)
    return CarrierActivations(
        harmful=data[:n],
        harmless=data[n:],
        layers=tuple(int(x) for x in acts.layers),
        positions=tuple(acts.positions),
        name=f"{harmful.name} vs {harmless.name}",
    )


def cone_at(acts: CarrierActivations, layer: int, k: int) -> tuple[Tensor | None, float]:
    """The cheap cone (METHODS §3, ``source="positions"``, ``n_svd = k``) at one layer, computed
    exactly as :func:`safegeom.carriers.cones.cheap_cone` does from these activations.

    Returns:
        ``(basis [k, d] float64 orthonormal rows, effective rank of the raw source vectors)``;
        ``(None, nan)`` where the sources span fewer than ``k`` dimensions (e.g. the embedding
        layer, where every prompt has the same ``t_post`` tokens).
    """
    j = acts.layers.index(layer)
    post = list(acts.post)
    h, s = acts.harmful[:, j, post], acts.harmless[:, j, post]  # [n, P, d]
    dim = h.mean(0) - s.mean(0)
    raw = list(dim.flip(0))
    diffs = h[:, -1] - s[:, -1].mean(0)
    _, sv, vh = torch.linalg.svd(diffs, full_matrices=False)
    top = min(k, len(sv))
    raw += list(vh[:top] * (sv[:top, None] / len(diffs) ** 0.5))
    stacked = torch.stack(raw)
    if not _live(stacked, acts.scale(layer)):
        return None, float("nan")
    try:
        return gram_schmidt(stacked, k), effective_rank(stacked)
    except SafegeomError:
        return None, float("nan")


def _live(v: Tensor, scale: float) -> bool:
    """Whether ``v`` is more than float noise against activations of size ``scale``."""
    return bool(v.norm() > 1e-7 * max(scale, 1e-300))


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
    """Drift and cosine to base of one carrier kind at every layer: ``base`` and ``own`` are
    ``[layer, d]`` diff-in-means (each its own sign reference, METHODS §5). Layers where either
    is zero up to float noise (no direction, e.g. ``t_post`` at the embedding layer) get no row.

    Returns:
        ``direction_drift`` and ``cosine_to_base`` rows (source ``reextracted``).
    """
    rows = []
    n = len(acts.harmful) + len(acts.harmless)
    for j, layer in enumerate(layers):
        scale = acts.scale(layer)
        if not (_live(base[j], scale) and _live(own[j], scale)):
            continue
        drift = direction_drift(base[j], own[j], reference=(base[j], own[j]))
        common = {"layer": layer, "carrier": carrier, "source": "reextracted",
                  "prompts": acts.name, "n": n}  # fmt: skip
        rows.append(_row("direction_drift", drift, **common))
        rows.append(_row("cosine_to_base", 1.0 - drift, **common))
    return rows


def coordinate_rows(
    basis: Tensor, harmful: Tensor, harmless: Tensor, source: str, layer: int, prompts: str
) -> list[dict[str, Any]]:
    """Per-basis-vector Cohen's d (``coordinate_separation``, carrier ``cone[j]``) and the
    imbalance (carrier ``cone``) of a cone on activations at one layer.

    Returns:
        The rows (``n`` = prompts of both classes).
    """
    stats = coordinate_statistics(basis, harmful, harmless)
    n = len(harmful) + len(harmless)
    common = {"layer": layer, "source": source, "prompts": prompts, "n": n}
    rows = [
        _row("coordinate_separation", sep, carrier=f"cone[{j}]", **common)
        for j, sep in enumerate(stats["separation"])
    ]
    if np.isfinite(stats["separation"]).all():
        rows.append(_row("coordinate_imbalance", coordinate_imbalance(stats), carrier="cone",
                         **common))  # fmt: skip
    return rows


def geometry_rows(
    reference: Any, acts: CarrierActivations, config: AuditConfig, layers: Sequence[int]
) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
    """The geometry family on one checkpoint's carrier activations.

    ``reference`` is the :class:`~safegeom.audit.reference.Reference` (typed loosely to keep this
    module free of it). Per layer in ``layers``: drift and cosine to base of refusal (at r₀'s
    position) and harmfulness (at ``t_inst``), principal_angle_max and grassmann_distance between
    the base's and the checkpoint's cones, hr_coupling (``hr``: |cos(h_t, r_t)|; ``hr-cone``:
    mean cos² between h_t and B_t), effective rank of B_t's sources. At r₀'s layer: coordinate
    statistics of B₀ (``fixed``) and B_t (``reextracted``) at ``t_post[-1]``; projection
    separation on r₀, h₀ (``fixed``) and r_t, h_t (``reextracted``) with bootstrap CIs.

    Returns:
        ``(rows, carriers)`` with ``carriers`` the re-extracted ``refusal`` (r_t) and
        ``harmfulness`` (h_t) at the base's layer and position, ``cone`` (B_t, [k, d]).
    """
    name, n = acts.name, len(acts.harmful) + len(acts.harmless)
    r0, h0 = reference.refusal, reference.harmfulness
    pick = [reference.layer_index(x) for x in layers]
    own_r, own_h = acts.diff(r0.position), acts.diff("t_inst")
    own_idx = [acts.layers.index(x) for x in layers]
    rows = direction_rows("refusal", reference.refusal_layers[pick], own_r[own_idx], acts, layers)
    rows += direction_rows(
        "harmfulness", reference.harmfulness_layers[pick], own_h[own_idx], acts, layers
    )
    cones: dict[int, Tensor | None] = {}
    for j, layer in zip(own_idx, layers, strict=True):
        basis, rank = cone_at(acts, layer, reference.cone.k)
        cones[layer] = basis
        base_cone = reference.cone_layers[reference.layer_index(layer)]
        scale = acts.scale(layer)
        common = {"layer": layer, "source": "reextracted", "prompts": name, "n": n}
        if basis is not None and bool(base_cone.abs().sum() > 0):
            theta = principal_angles(base_cone, basis, hidden_size=basis.shape[-1])
            rows.append(_row("principal_angle_max", float(np.max(theta)), carrier="cone",
                             **common))  # fmt: skip
            rows.append(_row("grassmann_distance", float(np.sqrt(np.sum(theta**2))),
                             carrier="cone", **common))  # fmt: skip
        if basis is not None:
            rows.append(_row("effective_rank", rank, carrier="cone", **common))
        if _live(own_h[j], scale) and _live(own_r[j], scale):
            rows.append(_row("hr_coupling", coupling(own_h[j], own_r[j]), carrier="hr", **common))
        if basis is not None and _live(own_h[j], scale):
            value = coupling(own_h[j], basis, hidden_size=basis.shape[-1])
            rows.append(_row("hr_coupling", value, carrier="hr-cone", **common))
    at = r0.layer
    j = acts.layers.index(at)
    r_t, h_t = own_r[j], own_h[j]
    b_t = cones[at] if at in cones else cone_at(acts, at, reference.cone.k)[0]
    h_post, s_post = acts.at(at, acts.positions[acts.post[-1]])
    rows += coordinate_rows(reference.cone.vectors.double(), h_post, s_post, "fixed", at, name)
    if b_t is not None:
        rows += coordinate_rows(b_t, h_post, s_post, "reextracted", at, name)
    for carrier, position, fixed, own in (
        ("refusal", r0.position, r0.direction, r_t),
        ("harmfulness", "t_inst", h0.direction, h_t),
    ):
        harmful, harmless = acts.at(at, position)
        for source, vector in (("fixed", fixed), ("reextracted", own)):
            if not _live(vector.double(), acts.scale(at)):
                continue
            d, low, high = projection_separation(
                harmful,
                harmless,
                vector,
                n_resamples=config.n_resamples,
                seed=config.seed,
                scale=acts.scale(at),
            )
            rows.append(_row("projection_separation", d, layer=at, carrier=carrier,
                             source=source, prompts=name, ci_low=low, ci_high=high, n=n))  # fmt: skip
    return rows, {"refusal": r_t, "harmfulness": h_t, "cone": b_t}
