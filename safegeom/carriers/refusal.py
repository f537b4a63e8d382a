"""The refusal direction: diff-in-means candidates and their selection (Arditi et al. 2024).

1. Optional data filter: keep harmful prompts whose refusal score is > 0 and harmless ones < 0.
2. Candidates ``r[pos, layer] = mean_harmful − mean_harmless`` of ``resid_pre`` at every
   post-instruction position and layer, means accumulated in float64 (``capture_stats``).
3. Selection on a validation split: bypass, induce and KL scores of every candidate, computed in
   batched forward passes (:func:`~safegeom.carriers.candidate_scores.score_candidates`); discard zero
   candidates (a position every prompt shares at the embedding layer) and layers
   ≥ ``max_layer_fraction``·n_layers, both unscored (NaN scores in the table: they can never be
   picked, so the selection costs that fraction less; ``max_layer_fraction=1`` scores every
   layer), then KL > ``max_kl`` and induce < ``min_induce``; pick the lowest bypass score.
   Non-finite scores are an error (a model with NaN weights or logits).

Under a launcher (:mod:`safegeom.parallel.ranks`) every forward pass is shared out: the captures
shard through :mod:`safegeom.activations`, the filter and the selection scores through
:func:`~safegeom.carriers.row_scores.row_scores` (each rank runs its share of one process's batches),
and every rank ends with one process's selection (the CLI writes on rank 0 alone).

Each prompt set is tokenized once (:func:`safegeom.models.chat.encode_set`) and the
:class:`~safegeom.models.chat.EncodedSet` is passed to the filter, the capture and the scoring.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from safegeom.activations import CaptureConfig, capture_stats
from safegeom.carriers.candidate_scores import (
    ForwardCounter,
    refusal_log_odds,
    score_candidates,
)
from safegeom.carriers.carrier import Carrier
from safegeom.carriers.inputs import Prompts, encode, prompt_provenance, subset
from safegeom.carriers.row_scores import row_scores
from safegeom.carriers.selection import (
    DimCandidates,
    RefusalSelection,
    SelectionConfig,
    load_selection,
)
from safegeom.errors import NonFiniteError, SafegeomError
from safegeom.evaluation import refusal_token_ids
from safegeom.models.chat import EncodedSet
from safegeom.models.loading import LoadedModel
from safegeom.prompts import PromptSet, load_prompts

__all__ = [
    "DimCandidates",
    "RefusalSelection",
    "SelectionConfig",
    "dim_candidates",
    "filter_by_refusal",
    "load_selection",
    "passes_filters",
    "refusal_direction",
    "select_refusal_direction",
]


def _filter_encoded(
    lm: LoadedModel,
    harmful: EncodedSet,
    harmless: EncodedSet,
    tokens: Sequence[int] | None,
    counter: ForwardCounter | None,
) -> tuple[list[int], list[int]]:
    """Indices of the harmful prompts with refusal score > 0 and the harmless ones < 0."""
    ids = refusal_token_ids(lm, tokens)
    kept = []
    for enc, sign, label in ((harmful, 1, "harmful"), (harmless, -1, "harmless")):
        scores = row_scores(
            lm,
            enc.encoded,
            lambda lp, rows: refusal_log_odds(lp, ids),
            batch_size=64,
            counter=counter,
        )
        bad = int((~torch.isfinite(scores)).sum())
        if bad:
            raise NonFiniteError(
                f"the refusal scores of {bad} of {len(enc)} {label} prompts are NaN or inf: the "
                "model's logits are not finite (check its weights and --dtype)"
            )
        keep = [i for i, s in enumerate(scores.tolist()) if sign * s > 0]
        if not keep:
            raise SafegeomError(
                f"no {label} prompt survives the refusal-score filter; skip the filter with "
                "--no-filter (filter_train=False in Python)"
            )
        kept.append(keep)
    return kept[0], kept[1]


def filter_by_refusal(
    lm: LoadedModel,
    harmful: Prompts,
    harmless: Prompts,
    *,
    tokens: Sequence[int] | None = None,
    system: str | None = None,
    counter: ForwardCounter | None = None,
) -> tuple[PromptSet, PromptSet]:
    """Keep harmful prompts the model refuses (score > 0) and harmless ones it does not (< 0).

    Returns:
        The kept prompts of each class.

    Raises:
        NonFiniteError: a refusal score is NaN or inf (the model's logits are not finite).
        SafegeomError: a class is empty after filtering.
    """
    h_set, s_set = load_prompts(harmful), load_prompts(harmless)
    keep_h, keep_s = _filter_encoded(
        lm, encode(lm, h_set, system), encode(lm, s_set, system), tokens, counter
    )
    return h_set.select(keep_h), s_set.select(keep_s)


def dim_candidates(
    lm: LoadedModel,
    harmful: Prompts | EncodedSet,
    harmless: Prompts | EncodedSet,
    *,
    positions: str = "t_post",
    layers: str = "all",
    site: str = "resid_pre",
    system: str | None = None,
    progress: bool = True,
) -> DimCandidates:
    """Float64 diff-in-means candidates at every (position, layer) of ``site``.

    Returns:
        :class:`DimCandidates` with ``vectors[pos, layer] = mean_harmful − mean_harmless``.

    Raises:
        SafegeomError: an empty prompt set, an unknown position, a layer out of range, or the two
            classes with different post-instruction positions.
    """
    sets = (encode(lm, harmful, system), encode(lm, harmless, system))
    stats = [
        capture_stats(
            lm,
            enc,
            CaptureConfig(sites=site, layers=layers, positions=positions, system=system),
            progress=progress,
        )
        for enc in sets
    ]
    if stats[0].positions != stats[1].positions:
        raise SafegeomError(
            "harmful and harmless prompts have different post-instruction positions"
        )
    diff = stats[0].mean(site) - stats[1].mean(site)  # [layer, pos, d]
    return DimCandidates(
        vectors=diff.permute(1, 0, 2).contiguous(),
        positions=stats[0].positions,
        layers=stats[0].layers,
        n_harmful=len(sets[0]),
        n_harmless=len(sets[1]),
        provenance=prompt_provenance(lm, sets[0], sets[1]),
        n_forward=sum(st.n_forward for st in stats),
    )


def _spread(values: torch.Tensor, live: list[int], n: int) -> np.ndarray:
    """Scores of the ``live`` candidates at their rows, NaN at the unscored ones' rows (zero
    vectors, layers past the range)."""
    out = np.full(n, np.nan)
    out[live] = values.numpy()
    return out


def passes_filters(table: pd.DataFrame, config: SelectionConfig) -> pd.Series:
    """Which rows of a selection table scored with the KL and induce filters off would pass
    ``config``'s (``kept``, ``kl ≤ max_kl``, ``induce ≥ min_induce``): one scoring pass serves
    both the relaxed and the standard pick.

    Returns:
        A boolean Series over the table's rows.
    """
    return table["kept"] & (table["kl"] <= config.max_kl) & (table["induce"] >= config.min_induce)


def _reasons(table: pd.DataFrame, config: SelectionConfig, max_layer: float) -> list[str]:
    """Why each candidate is discarded (``""``: kept); ``max_layer`` is the bound the scoring
    used, so every unscored candidate is ``zero`` or ``layer``."""
    reasons = []
    for row in table.itertuples():
        if not row.norm > 0:
            reasons.append("zero")
        elif row.layer >= max_layer:
            reasons.append("layer")
        elif row.kl > config.max_kl:
            reasons.append("kl")
        elif row.induce < config.min_induce:
            reasons.append("induce")
        else:
            reasons.append("")
    return reasons


def _no_candidate(table: pd.DataFrame) -> SafegeomError:
    counts = table["reason"].value_counts().to_dict()
    why = ", ".join(f"{n} by {r}" for r, n in sorted(counts.items()))
    best = "; ".join(
        f"layer {r.layer} {r.position}: bypass {r.bypass:.3g}, induce {r.induce:.3g}, KL {r.kl:.3g}"
        for r in table.sort_values("bypass").head(3).itertuples()
    )
    return SafegeomError(
        f"no refusal-direction candidate passes the filters ({len(table)} candidates, dropped "
        f"{why}); best by bypass: {best}; loosen --max-layer-fraction, --max-kl or --min-induce"
    )


def select_refusal_direction(
    lm: LoadedModel,
    candidates: DimCandidates,
    harmful_val: Prompts | EncodedSet,
    harmless_val: Prompts | EncodedSet,
    config: SelectionConfig | None = None,
    *,
    counter: ForwardCounter | None = None,
    progress: bool = True,
) -> RefusalSelection:
    """Score the candidates inside the layer range on validation prompts and pick the refusal
    direction.

    Returns:
        :class:`RefusalSelection` with the carrier, the score table (every candidate; NaN scores
        for the zero ones and those at layers ≥ ``max_layer_fraction``·n_layers) and the
        candidates.

    Raises:
        NonFiniteError: a candidate or base score is NaN or inf.
        SafegeomError: no candidate passes the filters (the message gives the closest ones).
    """
    started = time.perf_counter()
    config = config or SelectionConfig()
    counter = counter or ForwardCounter()
    h_val, s_val = encode(lm, harmful_val, config.system), encode(lm, harmless_val, config.system)
    vectors, layers, positions = candidates.flat()
    norms = vectors.norm(dim=-1)
    max_layer = config.max_layer_fraction * lm.n_layers
    # a zero vector has no direction; a candidate past the layer range can never be picked
    live = [i for i in range(len(norms)) if bool(norms[i] > 0) and layers[i] < max_layer]
    scores = score_candidates(
        lm,
        vectors[live],
        [layers[i] for i in live],
        h_val.encoded,
        s_val.encoded,
        refusal_token_ids(lm, config.refusal_tokens),
        batch_size=config.batch_size,
        counter=counter,
        progress=progress,
    )
    table = pd.DataFrame(
        {
            "position": positions,
            "layer": layers,
            "bypass": _spread(scores.bypass, live, len(norms)),
            "induce": _spread(scores.induce, live, len(norms)),
            "kl": _spread(scores.kl, live, len(norms)),
            "norm": norms.numpy(),
        }
    )
    _check_finite(table.iloc[live], scores.base_harmful, scores.base_harmless)
    table["reason"] = _reasons(table, config, max_layer)
    table["kept"] = table["reason"] == ""
    kept = table[table["kept"]]
    if kept.empty:
        raise _no_candidate(table)
    pick = kept.sort_values("bypass").index[0]
    row = table.loc[pick]
    val_sets = {h_val.name: h_val.content_hash, s_val.name: s_val.content_hash}
    provenance = candidates.provenance.with_extra(
        harmful_val=h_val.name,
        harmful_val_hash=h_val.content_hash,
        harmless_val=s_val.name,
        harmless_val_hash=s_val.content_hash,
        n_val=[len(h_val), len(s_val)],
    )
    provenance = dataclasses.replace(provenance, prompt_sets={**provenance.prompt_sets, **val_sets})
    carrier = Carrier(
        vectors=vectors[pick],
        kind="refusal",
        method="dim",
        site="resid_pre",
        layer=int(row.layer),
        position=str(row.position),
        scores={
            "bypass": float(row.bypass),
            "induce": float(row.induce),
            "kl": float(row.kl),
            "base_harmful": scores.base_harmful,
            "base_harmless": scores.base_harmless,
        },
        provenance=provenance,
    )
    return RefusalSelection(
        carrier=carrier,
        table=table,
        n_forward_passes=counter.passes,
        n_rows=counter.rows,
        seconds=time.perf_counter() - started,
        candidates=candidates,
    )


def _check_finite(table: pd.DataFrame, base_harmful: float, base_harmless: float) -> None:
    if not np.isfinite([base_harmful, base_harmless]).all():
        raise NonFiniteError(
            f"the model's refusal scores without intervention are not finite (harmful "
            f"{base_harmful}, harmless {base_harmless}): its logits hold NaN or inf"
        )
    values = table[["bypass", "induce", "kl"]].to_numpy()
    bad = ~np.isfinite(values).all(axis=1)
    if bool(bad.any()):
        rows = table[bad]
        where = ", ".join(f"layer {r.layer} {r.position}" for r in rows.head(3).itertuples())
        raise NonFiniteError(
            f"{int(bad.sum())} of {len(table)} candidate scores are NaN or inf ({where}, ...): "
            "the model's logits under those interventions are not finite"
        )


def _take_equal(
    harmful: EncodedSet, harmless: EncodedSet, n: int, field: str, what: str
) -> tuple[EncodedSet, EncodedSet]:
    """The first ``n`` of each class; when a class is smaller, both get the smaller size."""
    use = min(n, len(harmful), len(harmless))
    if use < n:
        warnings.warn(
            f"{field} ({'--' + field.replace('_', '-')}) is {n} but the harmful {what} set has "
            f"{len(harmful)} prompts and the harmless one {len(harmless)}: using {use} per class",
            stacklevel=3,
        )
    return (
        harmful if use == len(harmful) else subset(harmful, range(use)),
        harmless if use == len(harmless) else subset(harmless, range(use)),
    )


def _as_set(prompts: Prompts | EncodedSet, n: int) -> PromptSet | EncodedSet:
    if isinstance(prompts, EncodedSet):
        return prompts if n >= len(prompts) else subset(prompts, range(n))
    return load_prompts(prompts).take(n)


def _select(prompts: PromptSet | EncodedSet, keep: list[int]) -> PromptSet | None:
    return prompts.select(keep) if isinstance(prompts, PromptSet) else None


def refusal_direction(
    lm: LoadedModel,
    harmful: Prompts | EncodedSet = "advbench:train",
    harmless: Prompts | EncodedSet = "alpaca:train",
    harmful_val: Prompts | EncodedSet = "advbench:val",
    harmless_val: Prompts | EncodedSet = "alpaca:val",
    config: SelectionConfig | None = None,
    *,
    progress: bool = True,
) -> RefusalSelection:
    """Extract and select the refusal direction end to end (filter, candidates, selection).

    Each prompt set is encoded once; the filter, the capture and the scoring share the encoding.
    Training sets are cut to ``n_train`` each; validation sets to ``n_val`` each, and to the
    smaller set's size for both classes (with a warning) when one is shorter.

    Returns:
        :class:`RefusalSelection`; its ``carrier`` is the unnormalised diff-in-means direction at
        the selected layer and position, with bypass/induce/KL scores and provenance; the
        forward-pass count includes the filter and the capture passes.

    Raises:
        NonFiniteError: the model's refusal scores are NaN or inf.
        SafegeomError: see :func:`filter_by_refusal` and :func:`select_refusal_direction`.
    """
    started = time.perf_counter()
    config = config or SelectionConfig()
    counter = ForwardCounter()
    system = config.system
    h_set, s_set = _as_set(harmful, config.n_train), _as_set(harmless, config.n_train)
    h, s = encode(lm, h_set, system), encode(lm, s_set, system)
    if config.filter_train:
        keep_h, keep_s = _filter_encoded(lm, h, s, config.refusal_tokens, counter)
        h = subset(h, keep_h, _select(h_set, keep_h))
        s = subset(s, keep_s, _select(s_set, keep_s))
    candidates = dim_candidates(
        lm, h, s, positions=config.positions, system=system, progress=progress
    )
    counter.passes += candidates.n_forward
    hv = encode(lm, harmful_val, system, take=config.n_val)
    sv = encode(lm, harmless_val, system, take=config.n_val)
    hv, sv = _take_equal(hv, sv, config.n_val, "n_val", "validation")
    selection = select_refusal_direction(
        lm, candidates, hv, sv, config, counter=counter, progress=progress
    )
    return RefusalSelection(
        carrier=selection.carrier,
        table=selection.table,
        n_forward_passes=counter.passes,
        n_rows=counter.rows,
        seconds=time.perf_counter() - started,
        candidates=candidates,
    )
