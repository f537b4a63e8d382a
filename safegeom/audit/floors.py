"""Noise floors of the geometry rows: rows of their own (``source`` ``floor``), per checkpoint and
layer, that say how large a statistic is from noise alone.

- **Split-half floor** of ``direction_drift``, ``cosine_to_base``, ``principal_angle_max`` and
  ``grassmann_distance``: the checkpoint's carrier prompts of each class are split at random into
  two disjoint halves, every carrier is refitted on each half from the activations already
  captured (:mod:`~safegeom.audit.refits`), and the statistic is taken between the two halves'
  carriers; ``config.n_resamples`` splits. Two carriers of one model on different prompts differ
  by this much; each half holds half the prompts, so the floor is conservative (a drift between
  two carriers of all the prompts each has less noise).
- **Random-direction floor** of ``hr_coupling``: the coupling of the checkpoint's carrier ``b``
  (refusal direction or cone) with ``config.n_resamples`` random unit directions (isotropic, d
  the hidden size) in place of the harmfulness direction: coupling's null given the carriers'
  dimensions (for a direction, |cos| of two random directions, about √(2/(π d)); for a k-dim
  cone, mean cos² = k/d).

Each floor row's ``value`` is the mean over splits (or directions) and ``ci_low``/``ci_high`` the
2.5 and 97.5 percentiles of that distribution (a band, not the CI of the mean); ``n`` is the
prompts behind each half-carrier (both classes), null for random directions; ``note`` says which
floor it is. A floor row exists where the statistic's own row exists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from safegeom.audit.activations import CarrierActivations
from safegeom.audit.batched_geometry import coupling, principal_angles
from safegeom.audit.geometry_ci import COUPLINGS
from safegeom.audit.refits import refit_resamples
from safegeom.audit.resample import split_halves
from safegeom.carriers.fit import Fitted

__all__ = ["FLOOR", "FLOORED", "floor_rows"]

FLOOR = "floor"
"""The ``source`` of a floor row."""

FLOORED = (
    "direction_drift",
    "cosine_to_base",
    "principal_angle_max",
    "grassmann_distance",
    "hr_coupling",
)
"""The metrics that get floor rows."""


def _row(metric: str, layer: int, carrier: str, values: Tensor, **fields: Any) -> dict[str, Any]:
    """A floor row: the mean of the finite ``values`` and their 2.5–97.5 percentile band."""
    x = values[torch.isfinite(values)].double()
    if not len(x):
        return {}
    low, high = torch.quantile(x, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {
        "metric": metric,
        "value": float(x.mean()),
        "ci_low": low,
        "ci_high": high,
        "layer": layer,
        "carrier": carrier,
        "source": FLOOR,
        **fields,
    }


def _split_half(
    reference: Any,
    acts: CarrierActivations,
    layer: int,
    points: Mapping[str, Fitted | None],
    halves: tuple[Any, Any],
) -> dict[tuple[str, str], Tensor]:
    """``(metric, carrier)`` → the statistic between the two halves' carriers, per split."""
    first = refit_resamples(reference, acts, layer, halves[0], points)
    second = refit_resamples(reference, acts, layer, halves[1], points)
    out: dict[tuple[str, str], Tensor] = {}
    for name, a in first.vectors.items():
        b = second.vectors[name]
        if a.dim() == 2:
            cos = coupling(a, b) * torch.sign((a * b).sum(-1))  # signed cosine
            out["direction_drift", name] = 1.0 - cos
            out["cosine_to_base", name] = cos
        else:
            theta = principal_angles(a, b)
            out["principal_angle_max", name] = theta.max(1).values
            out["grassmann_distance", name] = theta.pow(2).sum(1).sqrt()
    return out


def floor_rows(
    reference: Any,
    acts: CarrierActivations,
    own: Mapping[str, Mapping[int, Fitted | None]],
    rows: Sequence[Mapping[str, Any]],
    *,
    n_resamples: int,
    seed: int,
) -> list[dict[str, Any]]:
    """The floor rows of one checkpoint (module docstring), for the geometry ``rows`` already
    computed from ``acts`` (``own``: the checkpoint's carriers, name → layer → fit).

    Returns:
        Schema rows with ``source`` :data:`FLOOR` and a ``note``, in layer order.
    """
    generator = torch.Generator().manual_seed(seed + 1)  # the bootstrap draws from seed itself
    n, m = len(acts.harmful), len(acts.harmless)
    halves = split_halves(n, m, n_resamples, generator)
    directions = torch.randn(
        n_resamples, acts.harmful.shape[-1], generator=generator, dtype=torch.float64
    )
    wanted = {
        (r["metric"], r["layer"], r["carrier"])
        for r in rows
        if r.get("source") == "reextracted" and r["metric"] in FLOORED
    }
    half = {
        "prompts": acts.name,
        "n": n // 2 + m // 2,
        "note": f"split-half: two disjoint halves of {n // 2} + {m // 2} prompts, "
        f"{n_resamples} random splits",
    }
    out: list[dict[str, Any]] = []
    for layer in sorted({key[1] for key in wanted}):
        points = {name: fits.get(layer) for name, fits in own.items()}
        if any(key[1] == layer and key[0] != "hr_coupling" for key in wanted):  # split halves
            for (metric, name), values in _split_half(
                reference, acts, layer, points, halves
            ).items():
                if (metric, layer, name) in wanted:
                    out.append(_row(metric, layer, name, values, **half))
        for label, _, b in COUPLINGS:
            if ("hr_coupling", layer, label) not in wanted or points.get(b) is None:
                continue
            carrier = points[b].vectors.double()
            batch = carrier[None].expand(n_resamples, *carrier.shape)
            note = (
                f"random directions: coupling of {n_resamples} random unit vectors "
                f"(d={carrier.shape[-1]}) with the checkpoint's {b}"
            )
            values = coupling(directions, batch)
            out.append(_row("hr_coupling", layer, label, values, prompts=acts.name, note=note))
    return [row for row in out if row]
