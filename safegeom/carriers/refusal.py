"""The refusal direction: diff-in-means candidates and their selection (Arditi et al. 2024).

1. Optional data filter: keep harmful prompts whose refusal score is > 0 and harmless ones < 0.
2. Candidates ``r[pos, layer] = mean_harmful − mean_harmless`` of ``resid_pre`` at every
   post-instruction position and layer, means accumulated in float64 (``capture_stats``).
3. Selection on a validation split: bypass, induce and KL scores of every candidate, computed in
   batched forward passes (:func:`~safegeom.carriers.scoring.score_candidates`); discard NaN,
   layers ≥ ``max_layer_fraction``·n_layers, KL > ``max_kl`` and induce < ``min_induce``; pick the
   lowest bypass score.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
from jaxtyping import Float
from torch import Tensor

from safegeom.capture import capture_stats
from safegeom.carriers.carrier import Carrier
from safegeom.carriers.harmfulness import prompt_provenance
from safegeom.carriers.scoring import (
    ForwardCounter,
    last_logprobs,
    refusal_log_odds,
    score_candidates,
)
from safegeom.evaluate import refusal_token_ids
from safegeom.models.chat import encode_prompts
from safegeom.models.loading import LoadedModel
from safegeom.prompts import PromptSet, load_prompts

__all__ = [
    "DimCandidates",
    "RefusalSelection",
    "SelectionConfig",
    "dim_candidates",
    "filter_by_refusal",
    "refusal_direction",
    "select_refusal_direction",
]


@dataclass(frozen=True)
class SelectionConfig:
    """Settings of refusal-direction extraction; defaults follow Arditi et al. 2024."""

    n_train: int = 128
    """Prompts per class used for the means."""
    n_val: int = 32
    """Prompts per class used for selection."""
    positions: str = "t_post"
    """Candidate positions (default: every post-instruction template token)."""
    filter_train: bool = True
    """Keep harmful prompts with refusal score > 0 and harmless ones < 0 before fitting."""
    max_layer_fraction: float = 0.8
    """Discard candidates at layers ≥ this fraction of the depth."""
    max_kl: float = 0.1
    """Discard candidates whose ablation moves harmless next-token distributions more (nats)."""
    min_induce: float = 0.0
    """Discard candidates whose addition does not make harmless prompts refuse at least this much."""
    batch_size: int = 64
    """Rows per batched scoring pass."""
    system: str | None = None
    """Optional system prompt."""
    refusal_tokens: tuple[int, ...] | None = None
    """Override of the refusal first tokens (default: derived from the tokenizer)."""


@dataclass(frozen=True)
class DimCandidates:
    """Diff-in-means candidates ``[n_pos, n_layers, d]`` (float64) with their coordinates."""

    vectors: Float[Tensor, "pos layer d"]
    positions: tuple[str, ...]
    layers: tuple[int, ...]
    n_harmful: int
    n_harmless: int
    provenance: dict = field(default_factory=dict)
    n_forward: int = 0
    """Forward passes (batches) the two captures ran."""

    def flat(self) -> tuple[Float[Tensor, "C d"], list[int], list[str]]:
        """Candidates as rows, with the layer and position label of each row."""
        n_pos, n_layers, d = self.vectors.shape
        layers = [self.layers[j] for _ in range(n_pos) for j in range(n_layers)]
        positions = [self.positions[i] for i in range(n_pos) for _ in range(n_layers)]
        return self.vectors.reshape(n_pos * n_layers, d), layers, positions


@dataclass(frozen=True)
class RefusalSelection:
    """The selected carrier plus the full candidate table and the cost of the selection."""

    carrier: Carrier
    table: pd.DataFrame
    """One row per candidate: position, layer, bypass, induce, kl, norm, kept, reason."""
    n_forward_passes: int
    n_rows: int
    seconds: float


def filter_by_refusal(
    lm: LoadedModel,
    harmful: PromptSet,
    harmless: PromptSet,
    *,
    tokens: Sequence[int] | None = None,
    system: str | None = None,
    counter: ForwardCounter | None = None,
) -> tuple[PromptSet, PromptSet]:
    """Keep harmful prompts the model refuses (score > 0) and harmless ones it does not (< 0).

    Raises:
        ValueError: a class is empty after filtering.
    """
    ids = refusal_token_ids(lm, tokens)
    kept = []
    for prompts, sign, label in ((harmful, 1, "harmful"), (harmless, -1, "harmless")):
        enc = encode_prompts(
            lm.tokenizer, prompts.prompts, system=system, chat_template=lm.chat_template
        )
        scores = refusal_log_odds(last_logprobs(lm, enc, counter=counter), ids)
        keep = [i for i, s in enumerate(scores.tolist()) if sign * s > 0]
        if not keep:
            raise ValueError(
                f"no {label} prompt survives the refusal-score filter; pass filter_train=False"
            )
        kept.append(prompts.select(keep))
    return kept[0], kept[1]


def dim_candidates(
    lm: LoadedModel,
    harmful: PromptSet | str | Sequence[str],
    harmless: PromptSet | str | Sequence[str],
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
    """
    harmful_set, harmless_set = load_prompts(harmful), load_prompts(harmless)
    stats = [
        capture_stats(
            lm,
            prompts,
            sites=site,
            layers=layers,
            positions=positions,
            system=system,
            progress=progress,
        )
        for prompts in (harmful_set, harmless_set)
    ]
    if stats[0].positions != stats[1].positions:
        raise ValueError("harmful and harmless prompts have different post-instruction positions")
    diff = stats[0].mean(site) - stats[1].mean(site)  # [layer, pos, d]
    return DimCandidates(
        vectors=diff.permute(1, 0, 2).contiguous(),
        positions=stats[0].positions,
        layers=stats[0].layers,
        n_harmful=len(harmful_set),
        n_harmless=len(harmless_set),
        provenance=prompt_provenance(lm, harmful_set, harmless_set),
        n_forward=sum(st.n_forward for st in stats),
    )


def select_refusal_direction(
    lm: LoadedModel,
    candidates: DimCandidates,
    harmful_val: PromptSet | str | Sequence[str],
    harmless_val: PromptSet | str | Sequence[str],
    config: SelectionConfig = SelectionConfig(),
    *,
    counter: ForwardCounter | None = None,
    progress: bool = True,
) -> RefusalSelection:
    """Score every candidate on validation prompts and pick the refusal direction.

    Raises:
        ValueError: no candidate passes the filters (the message gives the closest ones).
    """
    started = time.perf_counter()
    counter = counter or ForwardCounter()
    h_val, s_val = load_prompts(harmful_val), load_prompts(harmless_val)
    enc = [
        encode_prompts(
            lm.tokenizer, p.prompts, system=config.system, chat_template=lm.chat_template
        )
        for p in (h_val, s_val)
    ]
    vectors, layers, positions = candidates.flat()
    scores = score_candidates(
        lm, vectors, layers, enc[0], enc[1], refusal_token_ids(lm, config.refusal_tokens),
        batch_size=config.batch_size, counter=counter, progress=progress,
    )  # fmt: skip
    table = pd.DataFrame(
        {
            "position": positions,
            "layer": layers,
            "bypass": scores.bypass.numpy(),
            "induce": scores.induce.numpy(),
            "kl": scores.kl.numpy(),
            "norm": vectors.norm(dim=-1).numpy(),
        }
    )
    max_layer = config.max_layer_fraction * lm.n_layers
    reasons = []
    for row in table.itertuples():
        if any(pd.isna(v) for v in (row.bypass, row.induce, row.kl)):
            reasons.append("nan")
        elif row.layer >= max_layer:
            reasons.append("layer")
        elif row.kl > config.max_kl:
            reasons.append("kl")
        elif row.induce < config.min_induce:
            reasons.append("induce")
        else:
            reasons.append("")
    table["reason"] = reasons
    table["kept"] = table["reason"] == ""
    kept = table[table["kept"]]
    if kept.empty:
        best = table.sort_values("bypass").head(3).to_dict("records")
        raise ValueError(
            f"no refusal-direction candidate passes the filters; best by bypass: {best}"
        )
    pick = kept.sort_values("bypass").index[0]
    row = table.loc[pick]
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
        provenance={
            **candidates.provenance,
            "harmful_val": h_val.name,
            "harmful_val_hash": h_val.content_hash,
            "harmless_val": s_val.name,
            "harmless_val_hash": s_val.content_hash,
            "n_val": [len(h_val), len(s_val)],
        },
    )
    return RefusalSelection(
        carrier=carrier,
        table=table,
        n_forward_passes=counter.passes,
        n_rows=counter.rows,
        seconds=time.perf_counter() - started,
    )


def refusal_direction(
    lm: LoadedModel,
    harmful: PromptSet | str = "advbench:train",
    harmless: PromptSet | str = "alpaca:train",
    harmful_val: PromptSet | str = "advbench:val",
    harmless_val: PromptSet | str = "alpaca:val",
    config: SelectionConfig = SelectionConfig(),
    *,
    progress: bool = True,
) -> RefusalSelection:
    """Extract and select the refusal direction end to end (filter, candidates, selection).

    Returns:
        :class:`RefusalSelection`; its ``carrier`` is the unnormalised diff-in-means direction at
        the selected layer and position, with bypass/induce/KL scores and provenance; the
        forward-pass count includes the filter and the capture passes.
    """
    started = time.perf_counter()
    counter = ForwardCounter()
    h = load_prompts(harmful).take(config.n_train)
    s = load_prompts(harmless).take(config.n_train)
    if config.filter_train:
        h, s = filter_by_refusal(
            lm, h, s, tokens=config.refusal_tokens, system=config.system, counter=counter
        )
    candidates = dim_candidates(
        lm, h, s, positions=config.positions, system=config.system, progress=progress
    )
    counter.passes += candidates.n_forward
    hv = load_prompts(harmful_val)
    sv = load_prompts(harmless_val)
    selection = select_refusal_direction(
        lm, candidates, hv.take(config.n_val), sv.take(config.n_val),
        config, counter=counter, progress=progress,
    )  # fmt: skip
    return RefusalSelection(
        carrier=selection.carrier,
        table=selection.table,
        n_forward_passes=counter.passes,
        n_rows=counter.rows,
        seconds=time.perf_counter() - started,
    )
