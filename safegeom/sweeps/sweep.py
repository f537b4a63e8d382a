"""The causal sweep: layer × strength × carrier, for ablation and addition, against matched controls.

Every cell (carrier, op, layer, strength, population) is compared with ``n_random`` (≥ 20)
random unit directions at the same layer, the same positions and the same norm (docs/methods.md §4):

- ``ablate``: ``h ← h − s (h·r̂) r̂`` at the block inputs and attention/MLP outputs of the cell's
  layers (``all`` by default, as in Arditi et al.), ``s`` = strength (1 removes the component);
- ``add``: ``h ← h + α r`` at the block input of one layer, all positions, ``α`` = strength in
  multiples of the carrier (``r`` keeps the diff-in-means norm; controls are random unit vectors
  scaled to ``‖r‖``). The docs/methods.md §4 proposal sweeps α ∈ [−2, 2].

The fast metric is the refusal score (last-position log-odds of refusal tokens, no generation).
All rows of a cell (prompts × [carrier + controls]) run in batched forward passes with
row-wise hooks. With ``generate=True`` each cell also generates greedy completions
for the carrier and every control and reports the substring judge's refusal rate.

Output: a tidy table with, per cell, ``effect`` (mean change of the metric against no
intervention), ``control_mean``/``control_std`` (over the random directions),
``effect_minus_control`` and its paired bootstrap CI over prompts, and ``control_rank`` (fraction
of controls whose effect is at least as large in magnitude: a permutation-style p-value).

The sweep is single-process. Under a launcher the entry points install the sharded twins
(:mod:`safegeom.execution`): the prompts × directions of every cell are then shared out, each
rank running its share of the batches one process runs, scored
(:func:`~safegeom.carriers.row_scores.row_scores`) or generated
(:func:`~safegeom.sweeps.generated.generated_refusals`), and every rank gets all values back in
order, so every rank builds one process's table (the same controls, from the same seed, and the
same bootstrap draws); the CLI writes on rank 0 alone. Inside
:func:`~safegeom.parallel.ranks.alone` (the audit) the sweep runs every batch itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from safegeom.artifacts import Provenance
from safegeom.bootstrap import bootstrap_diff_ci
from safegeom.carriers.carrier import Carrier
from safegeom.carriers.row_scores import row_scores
from safegeom.config import config_dict
from safegeom.errors import SafegeomError
from safegeom.evaluation import refusal_log_odds, refusal_token_ids
from safegeom.execution import shows_progress
from safegeom.generation import check_finite
from safegeom.interventions import ablate, ablate_rows, add, add_rows, vectors_hash
from safegeom.models.chat import EncodedPrompt, encode_set, is_pre_encoded
from safegeom.models.loading import LoadedModel
from safegeom.models.positions import parse_layers
from safegeom.prompts import Prompts, PromptSet, load_prompts
from safegeom.sweeps.config import SweepConfig
from safegeom.sweeps.generated import MakeIntervention, generated_refusals
from safegeom.sweeps.result import SweepResult

if TYPE_CHECKING:
    from safegeom.attacks import AttackSet

__all__ = ["causal_sweep", "causal_sweep_result", "random_controls"]


DEFAULT_CONFIG = SweepConfig()
"""The default grid (every field at its default)."""


def random_controls(
    d_model: int, n: int, *, seed: int, exclude: Tensor | None = None
) -> Float[Tensor, "n d"]:
    """``n`` random unit directions (seeded); if ``exclude`` is given, they are made orthogonal to
    it so no control is the carrier itself."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n, d_model, generator=gen, dtype=torch.float64)
    if exclude is not None:
        e = (exclude / exclude.norm()).double()
        dirs = dirs - (dirs @ e)[:, None] * e
    return (dirs / dirs.norm(dim=-1, keepdim=True)).float()


@dataclass(frozen=True)
class _Cell:
    carrier: str
    op: str
    layer: str
    strength: float


def _scores(
    lm: LoadedModel,
    encoded: Sequence[EncodedPrompt],
    tokens: Tensor,
    n_dirs: int,
    make_context,
    batch_size: int,
) -> Float[Tensor, "dirs n"]:
    rows = [e for _ in range(n_dirs) for e in encoded]
    scores = row_scores(
        lm,
        rows,
        lambda lp, _: refusal_log_odds(lp, tokens),
        batch_size=batch_size,
        batch_context=make_context,
    ).view(n_dirs, len(encoded))
    check_finite(scores, "sweep refusal scores")
    return scores


def _summarise(
    cell: _Cell,
    population: str,
    metric: str,
    per_dir: np.ndarray,
    base: np.ndarray,
    config: SweepConfig,
) -> dict:
    """per_dir: [1 + n_random, n] metric values; base: [n]."""
    effects = per_dir - base[None]
    carrier_effect = effects[0]
    controls = effects[1:]
    control_per_prompt = controls.mean(0)
    diff = carrier_effect - control_per_prompt
    low, high = bootstrap_diff_ci(
        carrier_effect, control_per_prompt, n_resamples=config.n_resamples, seed=config.seed
    )
    control_means = controls.mean(1)
    return {
        "carrier": cell.carrier,
        "op": cell.op,
        "layer": cell.layer,
        "strength": cell.strength,
        "population": population,
        "metric": metric,
        "base": float(base.mean()),
        "value": float(per_dir[0].mean()),
        "effect": float(carrier_effect.mean()),
        "control_mean": float(control_means.mean()),
        "control_std": float(control_means.std(ddof=1)) if len(control_means) > 1 else 0.0,
        "effect_minus_control": float(diff.mean()),
        "ci_low": low,
        "ci_high": high,
        "control_rank": float((np.abs(control_means) >= abs(carrier_effect.mean())).mean()),
        "n_prompts": int(base.shape[0]),
        "n_controls": int(controls.shape[0]),
    }


def causal_sweep(
    lm: LoadedModel,
    carriers: Mapping[str, Carrier] | Sequence[Carrier] | Carrier,
    harmful: Prompts | AttackSet = "advbench:val",
    harmless: Prompts | AttackSet = "alpaca:val",
    config: SweepConfig = DEFAULT_CONFIG,
    *,
    progress: bool = True,
) -> pd.DataFrame:
    """Run the sweep and return the tidy table (one row per cell × population × metric).

    The table of :func:`causal_sweep_result` (which also keeps the config and provenance).

    Raises:
        SafegeomError: a carrier of another hidden size, a layer out of range.
        NonFiniteError: NaN or inf scores (a NaN model, an overflowing strength).
    """
    return causal_sweep_result(lm, carriers, harmful, harmless, config, progress=progress).table


def causal_sweep_result(
    lm: LoadedModel,
    carriers: Mapping[str, Carrier] | Sequence[Carrier] | Carrier,
    harmful: Prompts | AttackSet = "advbench:val",
    harmless: Prompts | AttackSet = "alpaca:val",
    config: SweepConfig = DEFAULT_CONFIG,
    *,
    progress: bool = True,
) -> SweepResult:
    """Run the sweep (see the module docstring).

    Returns:
        A :class:`SweepResult`: the tidy table, ``config`` and a provenance naming the model,
        its weight hash, both prompt sets (name → content hash) and every carrier.

    Raises:
        SafegeomError: a carrier of another hidden size, a layer out of range, no carrier.
        NonFiniteError: NaN or inf scores (a NaN model, an overflowing strength).
    """
    named = _named(carriers)
    tokens = refusal_token_ids(lm)
    sources = {
        name: _population(spec, config.n_prompts)
        for name, spec in (("harmful", harmful), ("harmless", harmless))
    }
    populations = {name: load_prompts(source) for name, source in sources.items()}
    encoded = {
        name: list(encode_set(lm.tokenizer, source, chat_template=lm.chat_template).encoded)
        for name, source in sources.items()
    }
    base = {
        name: row_scores(
            lm, enc, lambda lp, _: refusal_log_odds(lp, tokens), batch_size=config.batch_size
        ).numpy()
        for name, enc in encoded.items()
    }
    for name, values in base.items():
        check_finite(torch.from_numpy(values), f"refusal scores of the {name} prompts")
    rows: list[dict] = []
    cells = _cells(lm, named, config)
    show = progress and shows_progress()
    bar = tqdm(total=len(cells) * len(encoded), desc="sweep", unit="cell", disable=not show)
    base_rates: dict[str, np.ndarray] = {}  # generated without intervention: the same every cell
    for name, carrier in named.items():
        carrier.check_model(lm.d_model, lm.weight_hash)
        dirs = torch.cat(
            [
                carrier.unit[None],
                random_controls(
                    lm.d_model, config.n_random, seed=config.seed, exclude=carrier.unit
                ),
            ]
        )
        norm = float(carrier.direction.norm())
        for cell in (c for c in cells if c.carrier == name):
            for pop, enc in encoded.items():
                context = _row_context(lm, cell, dirs, norm, len(enc))
                scores = _scores(lm, enc, tokens, dirs.shape[0], context, config.batch_size)
                rows.append(
                    _summarise(cell, pop, "refusal_score", scores.numpy(), base[pop], config)
                )
                if config.generate:
                    if pop not in base_rates:
                        base_rates[pop] = _generated(lm, sources[pop], [None], config)[0]
                    makers = [_intervention(lm, d, cell, norm) for d in dirs]
                    rates = _generated(lm, sources[pop], makers, config)
                    rows.append(
                        _summarise(cell, pop, "refusal_rate", rates, base_rates[pop], config)
                    )
                bar.update(1)
    bar.close()
    provenance = Provenance(
        model=lm.name,
        weight_hash=lm.weight_hash,
        prompt_sets={p.name: p.content_hash for p in populations.values()},
        config=config_dict(config),
        extra={
            "populations": {k: p.name for k, p in populations.items()},
            "carriers": {name: _describe_carrier(c) for name, c in named.items()},
            "refusal_tokens": [int(t) for t in tokens],
        },
    )
    return SweepResult(pd.DataFrame(rows), config, provenance)


def _describe_carrier(carrier: Carrier) -> dict[str, Any]:
    """A carrier's description for provenance: kind, method, site, layer, position, hash, source."""
    return {
        "kind": carrier.kind,
        "method": carrier.method,
        "site": carrier.site,
        "layer": int(carrier.layer),
        "position": carrier.position,
        "k": carrier.k,
        "sha256": vectors_hash(carrier),
        "weight_hash": carrier.provenance.get("weight_hash"),
    }


def _row_context(lm: LoadedModel, cell: _Cell, dirs: Tensor, norm: float, n: int):
    """Row-wise intervention factory for one cell: row ``i`` uses direction ``i // n``."""
    if cell.op == "ablate":
        return lambda r: ablate_rows(
            lm, dirs[[i // n for i in r]], layers=cell.layer, strength=cell.strength
        )
    layer = parse_layers(cell.layer, lm.n_layers)[0]
    scale = cell.strength * norm
    return lambda r: add_rows(lm, dirs[[i // n for i in r]] * scale, [layer] * len(r))


def _named(carriers: Mapping[str, Carrier] | Sequence[Carrier] | Carrier) -> dict[str, Carrier]:
    if isinstance(carriers, Carrier):
        carriers = [carriers]
    if isinstance(carriers, Mapping):
        named = dict(carriers)
    else:
        named = {}
        for c in carriers:
            key = f"{c.kind}-{c.method}-L{c.layer}"
            named[key if key not in named else f"{key}-{len(named)}"] = c
    if not named:
        raise SafegeomError("no carrier to sweep (--carrier)")
    return named


def _cells(lm: LoadedModel, named: Mapping[str, Carrier], config: SweepConfig) -> list[_Cell]:
    cells = []
    for name in named:
        if "ablate" in config.ops:
            for spec in config.ablate_layers:
                parse_layers(spec, lm.n_layers)  # validate early
                cells.extend(_Cell(name, "ablate", spec, s) for s in config.ablate_strengths)
        if "add" in config.ops:
            for layer in parse_layers(config.add_layers, lm.n_layers):
                cells.extend(_Cell(name, "add", str(layer), s) for s in config.add_strengths)
    return cells


def _population(spec: Prompts | AttackSet, n: int) -> PromptSet | AttackSet:
    """The first ``n`` prompts of a population: an attack set stays one (its token ids are
    replayed as optimised, :func:`~safegeom.models.chat.encode_set`), anything else is loaded."""
    if is_pre_encoded(spec):
        return spec.take(n)  # type: ignore[union-attr]
    return load_prompts(spec).take(n)  # type: ignore[arg-type]


def _generated(
    lm: LoadedModel,
    prompts: PromptSet | AttackSet,
    makers: list[MakeIntervention | None],
    config: SweepConfig,
) -> np.ndarray:
    """Substring-judged refusals (1/0) ``[len(makers), n]`` (:func:`generated_refusals`)."""
    return generated_refusals(lm, prompts, makers, max_new_tokens=config.max_new_tokens)


def _intervention(lm: LoadedModel, direction: Tensor, cell: _Cell, norm: float) -> MakeIntervention:
    """A maker of the cell's intervention along one unit ``direction`` (for generation)."""
    if cell.op == "ablate":
        if cell.strength == 1.0:
            return lambda: ablate(lm, direction, layers=cell.layer)
        return lambda: ablate_rows(lm, direction[None], layers=cell.layer, strength=cell.strength)
    return lambda: add(lm, direction * (cell.strength * norm), layers=int(cell.layer))
