"""The audit table: one tidy row per (checkpoint, step, layer, carrier, source, anchor, prompts,
metric).

Columns (:data:`COLUMNS`):

============ ======== ===========================================================================
column       type     meaning
============ ======== ===========================================================================
checkpoint   str      the checkpoint's label (``base``, ``step-000040``, a folder name)
step         int      its training step (the base is step 0)
layer        Int64    the layer of a per-layer metric; null where not per layer
carrier      str      ``refusal``, ``harmfulness``, ``cone`` (``cone[j]`` for one basis vector),
                      ``hr`` (h and r, direction coupling), ``hr-cone`` (h and the cone, subspace
                      coupling); null for behaviour
source       str      ``fixed`` (the base's carrier applied to the checkpoint), ``reextracted``
                      (the checkpoint's own carrier) or ``floor`` (the noise floor of the
                      ``reextracted`` row with the same metric, layer and carrier; see below);
                      ``fixed-attack:NAME`` on the rows of an attack set replayed at every
                      checkpoint (:mod:`~safegeom.audit.transfer_rows`); null for behaviour
anchor       str      the reference a row compares with: ``base`` (the trajectory's base) on
                      every geometry, interference and causal row; an anchor's name
                      (``--anchor NAME=MODEL``) on the geometry rows measured against that
                      anchor's carriers; null on behaviour, attack and re-selection rows (a table
                      saved before the column existed reads back with this rule,
                      :func:`with_anchor`)
prompts      str      the prompt set the number is about (behaviour), else the carrier sets' name
metric       str      one of :data:`METRICS`
value        float    the number
ci_low       float    95% bootstrap CI, where there is one (else null)
ci_high      float
n            Int64    prompts (or prompt pairs) behind the number
judge        str      the refusal judge of a behaviour number; null elsewhere
unit         str      the value's unit (:data:`UNITS`), on every row
note         str      what a ``floor`` row measures (split-half or random directions); null
                      elsewhere
saturated    boolean  on causal rows: the cell's un-intervened score (``ablation_base``,
                      ``addition_base``) is within ``AuditConfig.saturation_margin`` of the end
                      the intervention pushes toward, so an effect near 0 may mean "nothing left
                      to move" rather than "the carrier no longer acts"; null elsewhere
============ ======== ===========================================================================

Uncertainty. Every geometry row has a 95% bootstrap CI over the carrier prompts
(:mod:`~safegeom.audit.geometry_ci`: each class resampled, the carriers refitted from the captured
activations, the statistic recomputed; the base's carriers held fixed). Beside them, rows with
``source`` ``floor`` (:mod:`~safegeom.audit.floors`) give each drift, cosine, angle and coupling
row's noise floor at the same checkpoint and layer: ``value`` the floor's mean, ``ci_low`` and
``ci_high`` the 2.5–97.5 percentile band of its distribution. A ``reextracted`` value inside its
floor's band is what re-extracting the carrier from these prompts gives without any change.

Interference (:mod:`~safegeom.audit.interference`, our proposal): ``interference_grad_resid`` (at
r₀'s layer) and ``interference_grad_weights`` (no layer) have carrier and source null;
``interference_cone_share`` has carrier ``cone`` and source ``fixed`` (the base's cone). Each has a
bootstrap CI over prompts and a ``floor`` row with the same metric and layer: the cosine of random
directions in the gradient's dimension, or the share of the change in random k-dim subspaces.

Rows that are not written, and why:

- ``coordinate_separation`` of a re-extracted cone's ``cone[j]``, j ≥ 1: the cone's first basis
  vector is the diff-in-means at the position the coordinates are read at, and the others are
  orthogonalised against it, so their class means agree by construction (d = 0 up to float
  rounding, no information). The re-extracted ``coordinate_imbalance`` is then a function of
  ``cone[0]``'s separation alone; the ``fixed`` rows (the base's cone on the checkpoint) keep
  every ``cone[j]``.
- ``refusal`` (and any carrier read at a ``t_post`` position) at layer 0: ``resid_pre`` of layer
  0 is the token embedding, and the post-instruction tokens are the same in every prompt, so
  harmful and harmless activations agree there and the diff-in-means is zero: no direction, no
  drift, cosine or coupling. ``harmfulness`` reads ``t_inst`` (the prompt's own last instruction
  token) and has layer-0 rows. The same holds for any layer where a carrier is zero up to float
  noise (:data:`~safegeom.audit.activations.NOISE_FLOOR`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from safegeom.errors import SafegeomError

__all__ = ["ANCHORED", "BASE_ANCHOR", "COLUMNS", "METRICS", "UNITS", "frame", "with_anchor"]

COLUMNS: tuple[str, ...] = (
    "checkpoint",
    "step",
    "layer",
    "carrier",
    "source",
    "anchor",
    "prompts",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "n",
    "judge",
    "unit",
    "note",
    "saturated",
)
"""The table's columns, in order."""

METRICS: dict[str, str] = {
    # behaviour (carrier and source null)
    "refusal_rate": "share of prompts the judge calls refused (harmful and harmless sets)",
    "asr": "attack success rate on a harmful set: 1 − refusal_rate",
    "over_refusal": "refusal_rate on a harmless set",
    "refusal_score": "mean refusal log-odds at the first answer position (docs/methods.md §1)",
    "kl_to_base": "mean KL(base ‖ checkpoint) of next-token distributions on harmless prompts, nats",
    "cross_entropy": "mean per-token cross-entropy of held-out reference completions, nats",
    "task_accuracy": "exact-match accuracy on the trajectory task's held-out problems",
    # geometry
    "direction_drift": "1 − |cos(carrier_base, carrier_t)| (sign fixed), per layer",
    "cosine_to_base": "cos(carrier_base, carrier_t) with the sign fixed by harmful − harmless",
    "principal_angle_max": "largest principal angle between B_base and B_t, radians",
    "grassmann_distance": "√Σθᵢ² of the principal angles between B_base and B_t",
    "hr_coupling": "|cos(h, r)| for directions; mean cos² of principal angles for subspaces",
    "effective_rank": "exp(entropy(σ/Σσ)) of the singular values of the cone's stacked raw source "
    "vectors (the diff-in-means at every t_post position and the top cone_k singular directions "
    "of the per-prompt differences, before orthonormalising), not of its k-row basis: between 1 "
    "and the number of sources, so it can exceed cone_k",
    "coordinate_separation": "Cohen's d of ⟨h, b_j⟩ between harmful and harmless (per b_j)",
    "coordinate_imbalance": "standard deviation of coordinate_separation across the basis",
    "projection_separation": "Cohen's d of the projection on a direction, harmful vs harmless",
    # causal (effect − mean of ≥ 20 matched random directions, paired bootstrap CI)
    "ablation_effect": "change of harmful refusal score when the carrier is ablated, minus controls",
    "addition_effect": "change of harmless refusal score when the carrier is added, minus controls",
    "ablation_raw": "the ablation's change of refusal score before subtracting the controls",
    "addition_raw": "the addition's change of refusal score before subtracting the controls",
    "ablation_control_mean": "mean change under the matched random directions (ablation)",
    "ablation_control_std": "standard deviation of that change across the random directions",
    "addition_control_mean": "mean change under the matched random directions (addition)",
    "addition_control_std": "standard deviation of that change across the random directions",
    "ablation_base": "un-intervened mean refusal score of the harmful prompts of the ablation",
    "addition_base": "un-intervened mean refusal score of the harmless prompts of the addition",
    # interference (docs/methods.md §14, our proposal)
    "interference_grad_resid": "cos(−∇ task loss, ∇ harmful refusal score) w.r.t. a vector added "
    "to the residual stream at the carrier layer at every position; < 0: a task step lowers refusal",
    "interference_grad_weights": "cos(−∇ task loss, ∇ harmful refusal score) w.r.t. the weights of "
    "the decoder blocks' linear projections; < 0: a task step lowers refusal",
    "interference_cone_share": "share Σ‖P_B(h_t − h_0)‖² / Σ‖h_t − h_0‖² of the activation change on "
    "harmful prompts inside the base's cone B_0 (a random k-dim subspace takes k/d)",
    # fixed-source transfer (only with attacks; source fixed-attack:NAME, docs/methods.md §11)
    "attack_asr": "share of an attack set's adversarial prompts whose answer the judge does not "
    "call refused",
    "attack_target_logprob": "mean log-probability per token of the attack's target after its "
    "adversarial prompt (a prefill counts as target), nats",
    "attack_refusal_score": "mean refusal log-odds at the last position of the adversarial "
    "prompts as optimised",
    # re-selection (only with reselect)
    "bypass_score": "refusal score on harmful prompts with the checkpoint's own r ablated",
    "induce_score": "refusal score on harmless prompts with the checkpoint's own r added",
    "selection_kl": "KL of the ablation on harmless prompts, the selection's third filter",
}
"""Every metric name the audit writes, with its meaning and units."""

_DTYPES = {
    "checkpoint": "string",
    "step": "int64",
    "layer": "Int64",
    "carrier": "string",
    "source": "string",
    "anchor": "string",
    "prompts": "string",
    "metric": "string",
    "value": "float64",
    "ci_low": "float64",
    "ci_high": "float64",
    "n": "Int64",
    "judge": "string",
    "unit": "string",
    "note": "string",
    "saturated": "boolean",
}

_SCORE = "nats (log-odds)"
UNITS: dict[str, str] = {
    "refusal_rate": "fraction",
    "asr": "fraction",
    "over_refusal": "fraction",
    "refusal_score": _SCORE,
    "kl_to_base": "nats",
    "cross_entropy": "nats per token",
    "task_accuracy": "fraction",
    "direction_drift": "1 − cosine",
    "cosine_to_base": "cosine",
    "principal_angle_max": "radians",
    "grassmann_distance": "radians",
    "hr_coupling": "|cosine| or mean cos²",
    "effective_rank": "dimensions",
    "coordinate_separation": "Cohen's d",
    "coordinate_imbalance": "Cohen's d",
    "projection_separation": "Cohen's d",
    **{
        f"{op}_{part}": _SCORE
        for op in ("ablation", "addition")
        for part in ("effect", "raw", "control_mean", "control_std", "base")
    },
    "interference_grad_resid": "cosine",
    "interference_grad_weights": "cosine",
    "interference_cone_share": "fraction of squared norm",
    "attack_asr": "fraction",
    "attack_target_logprob": "nats per token",
    "attack_refusal_score": _SCORE,
    "bypass_score": _SCORE,
    "induce_score": _SCORE,
    "selection_kl": "nats",
}
"""The unit of every metric in :data:`METRICS` (the ``unit`` column): dimensionless ratios say
what they are a ratio of."""


BASE_ANCHOR = "base"
"""The ``anchor`` of the rows measured against the trajectory's own base."""

ANCHORED: frozenset[str] = frozenset(
    m
    for m in METRICS
    if not m.startswith("attack_")
    and m
    not in {
        "refusal_rate",
        "asr",
        "over_refusal",
        "refusal_score",
        "kl_to_base",
        "cross_entropy",
        "task_accuracy",
        "bypass_score",
        "induce_score",
        "selection_kl",
    }
)
"""Metrics whose rows compare the checkpoint with a reference's carriers (geometry,
interference, causal): their ``anchor`` is never null."""


def frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """The rows as a table with :data:`COLUMNS` in order and fixed dtypes (missing keys null;
    ``unit`` always from :data:`UNITS`; ``anchor`` :data:`BASE_ANCHOR` on an :data:`ANCHORED`
    row that names none).

    Raises:
        SafegeomError: a row names a column or a metric the schema does not know.
    """
    rows = list(rows)
    for row in rows:
        extra = set(row) - set(COLUMNS)
        if extra:
            raise SafegeomError(f"audit row has unknown columns {sorted(extra)}")
        if row.get("metric") not in METRICS:
            raise SafegeomError(f"audit row has unknown metric {row.get('metric')!r}")
    records = [
        {
            **{c: row.get(c) for c in COLUMNS},
            "unit": UNITS[row["metric"]],
            "anchor": row.get("anchor") or _default_anchor(row["metric"]),
        }
        for row in rows
    ]
    table = pd.DataFrame(records, columns=list(COLUMNS))
    return table.astype(_DTYPES)


def _default_anchor(metric: str) -> str | None:
    return BASE_ANCHOR if metric in ANCHORED else None


def with_anchor(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with the ``anchor`` column: a table saved before it existed gets
    :data:`BASE_ANCHOR` on its :data:`ANCHORED` rows and null elsewhere, in :data:`COLUMNS`
    order; a table that has it is returned as it is.

    Returns:
        The table (a new one where the column was added).

    Example:
        >>> old = frame([{"step": 0, "metric": "cosine_to_base", "value": 1.0}])
        >>> old = old.drop(columns="anchor")
        >>> with_anchor(old)["anchor"].tolist()
        ['base']
    """
    if "anchor" in table.columns:
        return table
    anchors = [_default_anchor(m) for m in table["metric"]]
    out = table.assign(anchor=pd.array(anchors, dtype="string"))
    order = [c for c in COLUMNS if c in out.columns]
    return out[order + [c for c in out.columns if c not in order]]
