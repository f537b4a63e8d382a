"""The naive way of bench_audit.py: the geometry and causal families of one checkpoint with the
public API, one capture per metric family and one forward pass per direction (see that script's
docstring); each returns its numbers keyed as the audit's rows are."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

import safegeom as sg
import safegeom.geometry as geo
from safegeom.audit import AuditConfig, Reference
from safegeom.audit.geometry_rows import projection_separation
from safegeom.bootstrap import bootstrap_diff_ci
from safegeom.carriers.refusal import dim_candidates
from safegeom.errors import SafegeomError
from safegeom.evaluation import refusal_scores
from safegeom.models.positions import parse_layers
from safegeom.prompts import combine_prompts
from safegeom.sweeps.sweep import random_controls

Key = tuple[str, str, str, int | None]
"""(metric, carrier, source, layer): how a naive number is matched with the audit's row."""


def _live(v: Tensor, scale: Tensor) -> bool:
    """Whether ``v`` is more than float noise against activations the size of ``scale``."""
    return bool(v.norm() > 1e-7 * max(float(scale.norm()), 1e-300))


def naive_geometry(lm: Any, ref: Reference, config: AuditConfig) -> tuple[dict[Key, float], Tensor]:
    """The geometry family with a separate capture per metric family (see the module docstring).

    Returns:
        ``(numbers keyed like the audit's rows (:data:`Key`), r_t)``: r_t is the re-extracted
        refusal direction at r₀'s layer and position (the causal family's ``reextracted``).
    """
    r0, h0, at = ref.refusal, ref.harmfulness, ref.refusal.layer
    layers = parse_layers(config.layers, lm.n_layers)
    harmful = combine_prompts(config.harmful).take(config.n_per_class)
    harmless = combine_prompts(config.harmless).take(config.n_per_class)
    setting = {"batch_size": config.batch_size, "system": config.system}
    common = {**setting, "progress": False}
    out: dict[Key, float] = {}
    # 1. Drift, cosine to base and direction coupling: float64 means at every layer.
    stats = [
        sg.capture_stats(
            lm,
            p,
            sg.CaptureConfig(layers=list(layers), positions="t_inst,t_post", **setting),
            progress=False,
        )
        for p in (harmful, harmless)
    ]
    means = [s.mean("resid_pre") for s in stats]  # [layer, pos, d]
    pos = stats[0].positions
    own_r = means[0][:, pos.index(r0.position)] - means[1][:, pos.index(r0.position)]
    own_h = means[0][:, pos.index("t_inst")] - means[1][:, pos.index("t_inst")]
    for j, layer in enumerate(layers):
        i, scale = ref.layer_index(layer), means[0][j, 0]
        for carrier, base, own in (
            ("refusal", ref.refusal_layers[i], own_r[j]),
            ("harmfulness", ref.harmfulness_layers[i], own_h[j]),
        ):
            if _live(base, scale) and _live(own, scale):
                drift = geo.direction_drift(base, own, reference=(base, own))
                out["direction_drift", carrier, "reextracted", layer] = drift
                out["cosine_to_base", carrier, "reextracted", layer] = 1.0 - drift
        if _live(own_h[j], scale) and _live(own_r[j], scale):
            out["hr_coupling", "hr", "reextracted", layer] = geo.coupling(own_h[j], own_r[j])
    # 2. Re-extraction: the carrier functions again (each captures for itself), cones per layer.
    cands = dim_candidates(
        lm, harmful, harmless, layers=str(at), system=config.system, progress=False
    )
    r_t = cands.vectors[cands.positions.index(r0.position), 0]
    h_t = sg.harmfulness_direction(lm, harmful, harmless, layer=at, **common).direction
    cones: dict[int, Tensor] = {}
    for j, layer in enumerate(layers):
        try:
            cone = sg.cheap_cone(
                lm,
                harmful,
                harmless,
                k=config.cone_k,
                layer=layer,
                score=False,
                system=config.system,
            )
        except SafegeomError:  # the sources span fewer than k dimensions (the embedding layer)
            continue
        basis = cones[layer] = cone.vectors.double()
        theta = geo.principal_angles(
            ref.cone_layers[ref.layer_index(layer)], basis, hidden_size=lm.d_model
        )
        out["principal_angle_max", "cone", "reextracted", layer] = float(np.max(theta))
        out["grassmann_distance", "cone", "reextracted", layer] = float(np.sqrt(np.sum(theta**2)))
        out["effective_rank", "cone", "reextracted", layer] = cone.scores["effective_rank"]
        if _live(own_h[j], means[0][j, 0]):
            value = geo.coupling(own_h[j], basis, hidden_size=lm.d_model)
            out["hr_coupling", "hr-cone", "reextracted", layer] = value
    # 3. Projections and coordinate statistics: a per-prompt capture at r0's layer.
    acts = [
        sg.capture(
            lm,
            p,
            sg.CaptureConfig(
                layers=[at], positions="t_inst,t_post", dtype=torch.float32, **setting
            ),
            progress=False,
        )
        for p in (harmful, harmless)
    ]
    h_acts, s_acts = (a["resid_pre"][:, 0].double() for a in acts)  # [n, pos, d]
    labels = list(acts[0].positions)
    scale = float(torch.cat([h_acts, s_acts]).norm(dim=-1).pow(2).mean().sqrt())
    b_t = cones.get(at)
    for source, basis in (("fixed", ref.cone.vectors.double()), ("reextracted", b_t)):
        if basis is None:
            continue
        table = geo.coordinate_statistics(basis, h_acts[:, -1], s_acts[:, -1])
        for j, sep in enumerate(table["separation"][: 1 if source == "reextracted" else None]):
            out["coordinate_separation", f"cone[{j}]", source, at] = float(sep)
        out["coordinate_imbalance", "cone", source, at] = geo.coordinate_imbalance(table)
    for carrier, position, fixed, own in (
        ("refusal", r0.position, r0.direction, r_t),
        ("harmfulness", "t_inst", h0.direction, h_t),
    ):
        p = labels.index(position)
        for source, vector in (("fixed", fixed), ("reextracted", own)):
            d, _, _ = projection_separation(
                h_acts[:, p],
                s_acts[:, p],
                vector,
                scale=scale,
                n_resamples=config.n_resamples,
                seed=config.seed,
            )
            out["projection_separation", carrier, source, at] = d
    return out, r_t


def naive_causal(
    lm: Any, ref: Reference, r_t: Tensor, config: AuditConfig, *, progress: bool = True
) -> dict[Key, float]:
    """The causal family with one ``refusal_scores`` pass per direction: ablate r (every layer) on
    the harmful validation prompts, add ``+1·r`` at r₀'s layer on the harmless ones, for r₀ and
    r_t, each against the sweep's ``n_random`` controls (same seed: the audit's directions).

    Returns:
        ``{op}_effect`` (effect − control), ``_raw``, ``_control_mean``, ``_control_std``, keyed
        like the audit's rows."""
    at = ref.refusal.layer
    harmful = combine_prompts(config.harmful_val).take(config.n_val)
    harmless = combine_prompts(config.harmless_val).take(config.n_val)
    kw = {"batch_size": config.batch_size, "system": config.system, "progress": False}
    base = {
        "ablation": refusal_scores(lm, harmful, **kw).numpy(),
        "addition": refusal_scores(lm, harmless, **kw).numpy(),
    }
    out: dict[Key, float] = {}
    bar = tqdm(
        total=2 * 2 * (1 + config.n_random), desc="naive causal", unit="pass", disable=not progress
    )
    for source, vector in (("fixed", ref.refusal.direction), ("reextracted", r_t)):
        vector = vector.float()
        unit = vector / vector.norm()
        dirs = [unit, *random_controls(lm.d_model, config.n_random, seed=config.seed, exclude=unit)]
        for op, prompts in (("ablation", harmful), ("addition", harmless)):
            scores = []
            for d in dirs:
                value = (
                    sg.Ablation(d)
                    if op == "ablation"
                    else sg.Addition(d * vector.norm(), layers=at)
                )
                scores.append(refusal_scores(lm, prompts, intervention=value, **kw).numpy())
                bar.update(1)
            effects = np.stack(scores) - base[op][None]
            control = effects[1:].mean(0)
            # The CI the audit reports (its cost; not compared).
            bootstrap_diff_ci(effects[0], control, n_resamples=config.n_resamples, seed=config.seed)
            per_dir = effects[1:].mean(1)
            out[f"{op}_effect", "refusal", source, at] = float((effects[0] - control).mean())
            out[f"{op}_raw", "refusal", source, at] = float(effects[0].mean())
            out[f"{op}_control_mean", "refusal", source, at] = float(per_dir.mean())
            out[f"{op}_control_std", "refusal", source, at] = float(per_dir.std(ddof=1))
    bar.close()
    return out
