"""Task–safety interference of one checkpoint (docs/methods.md §14): rows with CIs and floors.

RefusalGuard names interference "between task optimization and safety features" as the third way
fine-tuning erodes safety, beside drift and distortion of the carriers; its measure is not
public. The measures here are **our proposal**:

- **Gradient interference** (``interference_grad_resid``, ``interference_grad_weights``): the
  cosine between the task's descent direction ``−∇L_task`` and the gradient ``∇s`` of the refusal
  score on harmful calibration prompts (the audit's first ``interference_n`` harmful carrier
  prompts), w.r.t. a vector added to the residual stream at r₀'s layer at every position, and
  w.r.t. the weights of the decoder blocks' linear projections (:mod:`~safegeom.audit.gradients`).
  ``L_task`` is the mean response cross-entropy of the trajectory task's first ``interference_n``
  training examples (the loss the fine-tuning descends), ``s`` the mean refusal score. Negative:
  a small task step lowers refusal on harmful prompts (interference); positive: it raises it.
  Only where the audit knows the task (a run folder's ``trajectory.json``, or ``--task``).
- **Representation interference** (``interference_cone_share``): the share
  ``Σᵢ‖P_B(h_t,i − h_0,i)‖² / Σᵢ‖h_t,i − h_0,i‖²`` of the checkpoint's activation change on the
  harmful carrier prompts that lies in the base's refusal cone ``B₀`` (``k = cone_k``), at r₀'s
  layer and the cone's read position (``t_post[-1]``); ``h_0`` is the base's activation on the same
  prompt. Summed over prompts (the share of the change's energy). No row where the change is float
  noise (the base against itself).

CIs: a bootstrap over prompts (``config.n_resamples`` draws from ``config.seed``): per-prompt
gradients (or per-prompt squared norms) are computed once and only their means resampled; the
task examples and the harmful prompts are resampled independently. Floors (``source`` ``floor``):
for a cosine, the cosine of a uniformly random direction with a fixed one in the same dimension
(``d`` or the weights' count ``D``; exact: ``(1 + cos)/2 ~ Beta((D−1)/2, (D−1)/2)``, a band of
about ``±2/√D`` around 0); for the share, the share of the same change in ``n_resamples`` random
``k``-dimensional subspaces (mean ``k/d``). As in :mod:`~safegeom.audit.floors`, ``value`` is the
floor's mean and ``ci_low``/``ci_high`` its 2.5–97.5 percentile band.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from safegeom.activations import CaptureConfig, capture
from safegeom.audit.activations import NOISE_FLOOR, POSITIONS, SITE, carrier_prompts
from safegeom.audit.config import AuditConfig
from safegeom.audit.floors import FLOOR
from safegeom.audit.gradients import Gradients, example_gradients
from safegeom.audit.resample import Draws, bootstrap_draws, percentile_interval
from safegeom.models.loading import LoadedModel

__all__ = [
    "METRICS",
    "cone_share",
    "gradient_cosines",
    "gradient_rows",
    "interference_rows",
    "random_cosines",
    "share_rows",
]

METRICS = ("interference_grad_resid", "interference_grad_weights", "interference_cone_share")
"""The metrics of the interference rows."""


def _cosines(gram: Float[Tensor, "n n"], n_task: int, draws: Draws) -> Float[Tensor, " R"]:
    """``cos(−Σ task gradients, Σ refusal gradients)`` of every resample (counts ``draws``: task
    examples as its first class, refusal prompts as its second), from the Gram matrix."""
    a, b = draws.harmful, draws.harmless
    tt, tr, rr = gram[:n_task, :n_task], gram[:n_task, n_task:], gram[n_task:, n_task:]
    dot = ((a @ tr) * b).sum(1)
    norm_a = ((a @ tt) * a).sum(1).clamp_min(0.0).sqrt()
    norm_b = ((b @ rr) * b).sum(1).clamp_min(0.0).sqrt()
    return -dot / (norm_a * norm_b)


def gradient_cosines(
    grads: Gradients, *, n_resamples: int, seed: int
) -> dict[str, tuple[float, float, float]]:
    """The gradient interference in both spaces, with bootstrap CIs over the examples (task
    examples and refusal prompts resampled independently, ``n_resamples`` draws from ``seed``).

    Returns:
        ``{"resid" | "weights": (cos(−∇L_task, ∇s), ci_low, ci_high)}`` (cosines, unitless); a
        space where either gradient is zero is left out.

    Example:
        >>> rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
        >>> g = Gradients(rows, rows @ rows.T, n_task=2, n_weights=2)
        >>> round(gradient_cosines(g, n_resamples=100, seed=0)["resid"][0], 4)  # cos(-(1,1), (-1,0))
        0.7071
    """
    generator = torch.Generator().manual_seed(seed)
    n_task = grads.n_task
    draws = bootstrap_draws(n_task, grads.n - n_task, n_resamples, generator)
    full = Draws(
        torch.ones(1, n_task, dtype=torch.float64),
        torch.ones(1, grads.n - n_task, dtype=torch.float64),
    )
    out = {}
    for space, gram in (("resid", grads.resid @ grads.resid.T), ("weights", grads.weights)):
        if not (
            float(gram[:n_task, :n_task].sum()) > 0 and float(gram[n_task:, n_task:].sum()) > 0
        ):
            continue
        value = float(_cosines(gram, n_task, full)[0])
        low, high = percentile_interval(_cosines(gram, n_task, draws), value)
        out[space] = (value, low, high)
    return out


def random_cosines(dimension: int, n: int, seed: int) -> np.ndarray:
    """Cosines of ``n`` uniformly random directions with a fixed one in ``dimension`` dimensions
    (exactly: ``2·Beta((D−1)/2, (D−1)/2) − 1``, numpy ``default_rng(seed)``).

    Returns:
        ``[n]`` cosines (mean 0, standard deviation ``1/√D``).

    Example:
        >>> x = random_cosines(10_000, 4000, seed=0)
        >>> bool(abs(x.std() * 100 - 1) < 0.05)  # 1/√D = 0.01
        True
    """
    half = (dimension - 1) / 2.0
    return 2.0 * np.random.default_rng(seed).beta(half, half, size=n) - 1.0


def cone_share(
    change: Float[Tensor, "n d"], basis: Float[Tensor, "k d"], *, n_resamples: int, seed: int
) -> tuple[float, float, float, Tensor]:
    """The share of ``change``'s squared norm (summed over rows) inside the span of ``basis``'s
    orthonormal rows, its bootstrap CI over rows, and the same share for random subspaces.

    Returns:
        ``(share, ci_low, ci_high, random)``: fractions of the squared norm; ``random`` ``[R]`` the
        share in ``n_resamples`` random ``k``-dimensional subspaces (mean ``k/d``).

    Example:
        >>> basis = torch.eye(4, dtype=torch.float64)[:1]
        >>> change = torch.tensor([[2.0, 0, 0, 0], [0, 1.0, 0, 0]], dtype=torch.float64)
        >>> cone_share(change, basis, n_resamples=100, seed=0)[0]  # 4 of 4 + 1
        0.8
    """
    x, b = change.double(), basis.double()
    inside = (x @ b.T).pow(2).sum(1)
    total = x.pow(2).sum(1)
    value = float(inside.sum() / total.sum())
    generator = torch.Generator().manual_seed(seed)
    counts = bootstrap_draws(len(x), 1, n_resamples, generator).harmful
    low, high = percentile_interval((counts @ inside) / (counts @ total), value)
    shares = []
    for start in range(0, n_resamples, 100):  # random subspaces, 100 at a time
        size = min(100, n_resamples - start)
        gauss = torch.randn(size, x.shape[1], b.shape[0], generator=generator, dtype=x.dtype)
        q = torch.linalg.qr(gauss).Q  # [size, d, k] orthonormal columns
        shares.append((x @ q).pow(2).sum((1, 2)) / total.sum())
    return value, low, high, torch.cat(shares)


def _floor(metric: str, values: Tensor | np.ndarray, note: str, **fields: Any) -> dict[str, Any]:
    """A floor row: the mean of ``values`` and their 2.5–97.5 percentile band."""
    x = torch.as_tensor(values, dtype=torch.float64)
    low, high = torch.quantile(x, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    row = {"metric": metric, "value": float(x.mean()), "ci_low": low, "ci_high": high}
    return {**row, **fields, "source": FLOOR, "note": note}


def _harmful_acts(lm: LoadedModel, config: AuditConfig, layer: int, position: str) -> Tensor:
    """The harmful carrier prompts' ``resid_pre`` at ``layer`` ``[n, d]`` (float64), captured the
    same way on every model, at ``position`` (``t_post``: its last token, where the cone's
    coordinates are read)."""
    harmful, _ = carrier_prompts(config)
    acts = capture(
        lm,
        harmful,
        CaptureConfig(
            layers=[layer],
            positions=POSITIONS,
            dtype=torch.float32,
            system=config.system,
            batch_size=config.batch_size,
        ),
        progress=False,
    )
    names = list(acts.positions)
    at = [p for p in names if p.startswith("t_post")][-1] if position == "t_post" else position
    return acts[SITE][:, 0, names.index(at)].double()


def share_rows(
    lm: LoadedModel, base: LoadedModel, reference: Any, config: AuditConfig
) -> list[dict[str, Any]]:
    """The representation interference row and its floor (module docstring); none where the
    checkpoint's activations equal the base's up to float noise.

    Returns:
        Schema rows (source ``fixed``: the base's cone; and ``floor``).
    """
    if lm is base:  # the base against itself: no change
        return []
    cone = reference.cone
    mine = _harmful_acts(lm, config, cone.layer, cone.position)
    theirs = _harmful_acts(base, config, cone.layer, cone.position)
    change = mine - theirs
    scale = float(theirs.norm(dim=-1).pow(2).mean().sqrt())
    if float(change.norm(dim=-1).pow(2).mean().sqrt()) <= NOISE_FLOOR * max(scale, 1e-300):
        return []
    basis = cone.vectors.double()
    value, low, high, random = cone_share(
        change, basis, n_resamples=config.n_resamples, seed=config.seed + 5
    )
    k, d = basis.shape
    harmful, _ = carrier_prompts(config)
    common = {"layer": cone.layer, "carrier": "cone", "prompts": harmful.name, "n": len(change)}
    note = (
        f"random subspaces: share of the same change in {config.n_resamples} random "
        f"{k}-dimensional subspaces (d={d}; expected k/d = {k / d:.4f})"
    )
    measured = {"value": value, "ci_low": low, "ci_high": high, "source": "fixed"}
    return [
        {"metric": "interference_cone_share", **measured, **common},
        _floor("interference_cone_share", random, note, **common),
    ]


def gradient_rows(
    lm: LoadedModel, reference: Any, config: AuditConfig, task: Any
) -> list[dict[str, Any]]:
    """The gradient interference rows and their floors (module docstring) for ``task`` (a
    :class:`~safegeom.training.tasks.Task`: its first ``config.interference_n`` training
    examples).

    Returns:
        Schema rows: ``interference_grad_resid`` at r₀'s layer, ``interference_grad_weights``
        (no layer), each with a ``floor`` row.
    """
    layer = reference.refusal.layer
    n = config.interference_n
    harmful = carrier_prompts(config)[0].take(n)
    pairs = (task.prompts[:n], task.responses[:n])
    grads = example_gradients(lm, layer, pairs, harmful, system=config.system)
    found = gradient_cosines(grads, n_resamples=config.n_resamples, seed=config.seed + 3)
    prompts = f"{task.name}[:{len(pairs[0])}] vs {harmful.name}"
    dims = {"resid": grads.resid.shape[1], "weights": grads.n_weights}
    rows = []
    for space, (value, low, high) in found.items():
        metric = f"interference_grad_{space}"
        common = {
            "layer": layer if space == "resid" else None,
            "prompts": prompts,
            "n": grads.n,
        }
        rows.append({"metric": metric, "value": value, "ci_low": low, "ci_high": high, **common})
        null = random_cosines(dims[space], config.n_resamples, config.seed + 4)
        note = (
            f"random directions: cosine of {config.n_resamples} uniformly random directions "
            f"with a fixed one in D={dims[space]} dimensions (exact null, about ±2/√D)"
        )
        rows.append(_floor(metric, null, note, **common))
    return rows


def interference_rows(
    lm: LoadedModel, reference: Any, config: AuditConfig, *, base: LoadedModel, task: Any
) -> list[dict[str, Any]]:
    """Every interference row of one checkpoint: the gradient rows where ``task`` is known, the
    representation share where the checkpoint differs from the base.

    ``reference`` is the audit's :class:`~safegeom.audit.reference.Reference` (typed loosely to
    keep this module free of it).

    Returns:
        Schema rows (module docstring).
    """
    rows = [] if task is None else gradient_rows(lm, reference, config, task)
    return rows + share_rows(lm, base, reference, config)
