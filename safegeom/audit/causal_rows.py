"""The causal family: fixed-source and re-extracted refusal directions, ablated and added, against
matched random directions, by refusal score (no generation), through
:func:`safegeom.sweeps.causal_sweep_result`.

On checkpoint t: ablate r (every layer, as in Arditi et al.) on the harmful validation prompts
(bypass) and add ``+1·r`` at r₀'s layer on the harmless ones (induce), for r = r₀ (source
``fixed``) and r = r_t (``reextracted``, the checkpoint's diff-in-means at r₀'s layer and
position). Each against ``n_random`` random unit directions of the same norm, orthogonal to r.
Rows: ``ablation_effect``/``addition_effect`` (effect − control mean, paired bootstrap CI over
prompts), ``*_raw`` (the effect), ``*_control_mean``/``*_control_std`` and ``*_base`` (the
un-intervened mean refusal score the effect starts from). ``layer`` is r₀'s layer (where the
addition acts and the carrier was read; the ablation acts at every layer).

Floor effects: every row of a cell carries ``saturated``, true where the un-intervened refusal
probability σ(base) is within ``config.saturation_margin`` of the end the intervention pushes
toward (0 for ablation, 1 for addition): there an effect near 0 may only mean that nothing is left
to move.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import pandas as pd
from torch import Tensor

from safegeom.audit.config import AuditConfig
from safegeom.carriers.carrier import Carrier
from safegeom.errors import SafegeomError
from safegeom.models.loading import LoadedModel
from safegeom.prompts import PromptSet, combine_prompts
from safegeom.sweeps import SweepConfig, causal_sweep_result

__all__ = ["causal_rows", "saturated", "sweep_config", "val_prompts"]

_METRICS = {
    ("ablate", "harmful"): "ablation",
    ("add", "harmless"): "addition",
}


def val_prompts(config: AuditConfig) -> tuple[PromptSet, PromptSet]:
    """The first ``n_val`` of the combined harmful and harmless validation sets.

    Returns:
        ``(harmful, harmless)``.
    """
    return (
        combine_prompts(config.harmful_val).take(config.n_val),
        combine_prompts(config.harmless_val).take(config.n_val),
    )


def sweep_config(config: AuditConfig, layer: int) -> SweepConfig:
    """The sweep of the causal family: ablate and add (coefficient 1 at ``layer``), ``n_random``
    controls, ``n_val`` prompts, the audit's seed, batch size and bootstrap resamples."""
    return SweepConfig(
        ops=("ablate", "add"),
        add_layers=str(layer),
        add_strengths=(1.0,),
        n_random=config.n_random,
        n_prompts=config.n_val,
        seed=config.seed,
        batch_size=config.batch_size or 128,
        n_resamples=config.n_resamples,
    )


def causal_rows(
    lm: LoadedModel,
    reference: Any,
    reextracted: Tensor,
    config: AuditConfig,
    *,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The causal rows of one checkpoint (see the module docstring).

    ``reference`` is the audit's :class:`~safegeom.audit.reference.Reference`; ``reextracted``
    the checkpoint's own refusal diff-in-means at r₀'s layer and position.

    Returns:
        Schema rows (without checkpoint and step); ``prompts`` is ``harmful_val vs harmless_val``.
    """
    r0: Carrier = reference.refusal
    r_t = Carrier(
        vectors=reextracted, kind="refusal", method="dim", layer=r0.layer, position=r0.position
    )
    harmful, harmless = val_prompts(config)
    carriers = {"fixed": r0, "reextracted": r_t}
    tables = []
    # Ablation is read on harmful prompts and addition on harmless ones only: each sweep gets a
    # one-prompt stand-in for the population it does not need (half the rows of one full sweep).
    for op, h_set, s_set in (
        ("ablate", harmful, harmless.take(1)),
        ("add", harmful.take(1), harmless),
    ):
        cfg = dataclasses.replace(sweep_config(config, r0.layer), ops=(op,))
        with warnings.catch_warnings():  # r₀ was found on the base: applying it is the point
            warnings.filterwarnings("ignore", message="carrier was found on weights")
            result = causal_sweep_result(lm, carriers, h_set, s_set, cfg, progress=progress)
        tables.append(result.table)
    table = pd.concat(tables, ignore_index=True)
    prompts = f"{harmful.name} vs {harmless.name}"
    return rows_from_sweep(table, r0.layer, prompts, margin=config.saturation_margin)


def saturated(op: str, base_score: float, margin: float) -> bool:
    """Whether a cell starting from mean refusal score ``base_score`` (log-odds) is within
    ``margin`` (probability units) of the end its intervention pushes toward: refusal probability
    σ(base) ≤ margin for ``ablation`` (nothing left to remove), ≥ 1 − margin for ``addition``.

    Raises:
        SafegeomError: an op other than ablation or addition.
    """
    p = 1.0 / (1.0 + math.exp(-base_score)) if base_score > -700 else 0.0
    if op == "ablation":
        return p <= margin
    if op == "addition":
        return p >= 1.0 - margin
    raise SafegeomError(f"no saturation rule for op {op!r}: use ablation or addition")


def rows_from_sweep(
    table: pd.DataFrame, layer: int, prompts: str, *, margin: float = 0.02
) -> list[dict[str, Any]]:
    """Schema rows from a sweep table whose carriers are named ``fixed`` and ``reextracted``.

    Returns:
        For ablation on harmful and addition on harmless prompts: ``{op}_effect`` (with CI),
        ``{op}_raw``, ``{op}_control_mean``, ``{op}_control_std``, ``{op}_base``, each flagged
        ``saturated`` (:func:`saturated` with ``margin``).
    """
    rows: list[dict[str, Any]] = []
    for rec in table.itertuples():
        op = _METRICS.get((rec.op, rec.population))
        if op is None or rec.metric != "refusal_score":
            continue
        common: Mapping[str, Any] = {
            "layer": layer,
            "carrier": "refusal",
            "source": rec.carrier,
            "prompts": prompts,
            "n": int(rec.n_prompts),
            "saturated": saturated(op, float(rec.base), margin),
        }
        rows.append(
            {
                "metric": f"{op}_effect",
                "value": float(rec.effect_minus_control),
                "ci_low": float(rec.ci_low),
                "ci_high": float(rec.ci_high),
                **common,
            }
        )
        rows.append({"metric": f"{op}_raw", "value": float(rec.effect), **common})
        rows.append({"metric": f"{op}_control_mean", "value": float(rec.control_mean), **common})
        rows.append({"metric": f"{op}_control_std", "value": float(rec.control_std), **common})
        rows.append({"metric": f"{op}_base", "value": float(rec.base), **common})
    return rows
