"""The audit table: one tidy row per (checkpoint, step, layer, carrier, source, prompts, metric).

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
source       str      ``fixed`` (the base's carrier applied to the checkpoint) or ``reextracted``
                      (the checkpoint's own carrier); null for behaviour
prompts      str      the prompt set the number is about (behaviour), else the carrier sets' name
metric       str      one of :data:`METRICS`
value        float    the number
ci_low       float    95% bootstrap CI, where there is one (else null)
ci_high      float
n            Int64    prompts (or prompt pairs) behind the number
judge        str      the refusal judge of a behaviour number; null elsewhere
============ ======== ===========================================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from safegeom.errors import SafegeomError

__all__ = ["COLUMNS", "METRICS", "frame"]

COLUMNS: tuple[str, ...] = (
    "checkpoint", "step", "layer", "carrier", "source", "prompts",
    "metric", "value", "ci_low", "ci_high", "n", "judge",
)  # fmt: skip
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
    "effective_rank": "exp(entropy(σ/Σσ)) of the cone's source vectors",
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
    # re-selection (only with reselect)
    "bypass_score": "refusal score on harmful prompts with the checkpoint's own r ablated",
    "induce_score": "refusal score on harmless prompts with the checkpoint's own r added",
    "selection_kl": "KL of the ablation on harmless prompts, the selection's third filter",
}
"""Every metric name the audit writes, with its meaning and units."""

_DTYPES = {
    "checkpoint": "string", "step": "int64", "layer": "Int64", "carrier": "string",
    "source": "string", "prompts": "string", "metric": "string", "value": "float64",
    "ci_low": "float64", "ci_high": "float64", "n": "Int64", "judge": "string",
}  # fmt: skip


def frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """The rows as a table with :data:`COLUMNS` in order and fixed dtypes (missing keys null).

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
    table = pd.DataFrame([{c: row.get(c) for c in COLUMNS} for row in rows], columns=list(COLUMNS))
    return table.astype(_DTYPES)
