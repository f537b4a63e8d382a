"""What the audit measures on one checkpoint: :func:`measure_checkpoint` → :class:`Measured`.

One capture pass over the carrier prompts (every layer of the reference, ``t_inst`` and every
``t_post`` token, per prompt) gives every geometry number and the re-extracted carriers
(:mod:`~safegeom.audit.geometry_rows`); the causal rows reuse the causal sweep
(:mod:`~safegeom.audit.causal_rows`); behaviour is :mod:`~safegeom.audit.behaviour_rows`. With
``config.reselect`` the full selection (bypass, induce, KL) is rerun on the checkpoint from the
same captured means (no second capture).

Sources: ``fixed`` numbers apply the base's carriers (r₀, h₀, B₀) to the checkpoint;
``reextracted`` numbers use the checkpoint's own carriers (r_t, h_t, B_t), extracted by the same
recipe from the same prompts. ``hr_coupling`` is the coupling of h_t and r_t on checkpoint t
(source ``reextracted``); at step 0 (the base measured by the runner like any checkpoint) it is
the base's coupling. Drift and cosine compare the base's per-layer diff-in-means with the
checkpoint's; every random number derives from ``config.seed``. With ``config.attacks`` every
attack set is replayed on the checkpoint as optimised (:mod:`~safegeom.audit.transfer_rows`):
rows of source ``fixed-attack:NAME``. With anchors (:mod:`~safegeom.audit.anchors`) the geometry
rows are computed again against each anchor's reference from the same capture (``anchor`` names
it; the base's rows say ``base``); the other families are the base's alone.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from safegeom.audit.behaviour_rows import behaviour_rows
from safegeom.audit.causal_rows import causal_rows, val_prompts
from safegeom.audit.config import AuditConfig
from safegeom.audit.geometry_rows import CarrierActivations, capture_carriers, geometry_rows
from safegeom.audit.interference import interference_rows
from safegeom.audit.reference import Reference, selection_config
from safegeom.audit.schema import BASE_ANCHOR, frame
from safegeom.audit.transfer_rows import transfer_rows
from safegeom.carriers.refusal import DimCandidates, select_refusal_direction
from safegeom.errors import ArtifactError
from safegeom.models.loading import LoadedModel
from safegeom.models.positions import parse_layers

if TYPE_CHECKING:
    from safegeom.training.tasks import Task

__all__ = ["PHASES", "Measured", "measure_checkpoint"]

PHASES = ("capture", "carriers", "interference", "causal", "generation", "scoring", "reselect")
"""The phases of :attr:`Measured.seconds`."""


@dataclass(frozen=True)
class Measured:
    """One checkpoint's rows, and what they cost."""

    rows: tuple[dict, ...]
    """Schema rows without ``checkpoint`` and ``step`` (the runner adds them)."""
    seconds: Mapping[str, float]
    """Wall seconds per phase (:data:`PHASES`): capture, carriers (geometry), interference
    (:mod:`~safegeom.audit.interference`), causal, generation (judged behaviour and task
    accuracy), scoring (refusal scores, KL, cross-entropy), reselect."""
    forward_passes: int
    """Batched forward passes run (every call of either model's forward, generation steps too)."""


@contextmanager
def _count_forwards(*models: Any) -> Iterator[list[int]]:
    """Count forward calls of the given modules (each distinct module once)."""
    count = [0]
    seen: list[Any] = []
    handles = []
    for m in models:
        if any(m is s for s in seen):
            continue
        seen.append(m)
        handles.append(m.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1)))
    try:
        yield count
    finally:
        for h in handles:
            h.remove()


def _check(
    lm: LoadedModel, references: Mapping[str, Reference], config: AuditConfig
) -> tuple[int, ...]:
    """The per-layer rows' layers, checked against the model and every reference."""
    layers = parse_layers(config.layers, lm.n_layers)
    for name, reference in references.items():
        if lm.d_model != reference.refusal.d_model:
            what = "the audit reference" if name == BASE_ANCHOR else f"anchor {name}'s reference"
            raise ArtifactError(
                f"hidden-size mismatch: {what} has d={reference.refusal.d_model}, the checkpoint "
                f"{lm.name} has d={lm.d_model}; audit checkpoints of the base's architecture"
            )
        for layer in layers:
            reference.layer_index(layer)
    return layers


def _reselect_rows(
    lm: LoadedModel, acts: CarrierActivations, config: AuditConfig, progress: bool
) -> list[dict[str, Any]]:
    """Full re-selection on the checkpoint from the captured means (candidates at every captured
    layer and ``t_post`` position): bypass, induce and KL of the selected candidate."""
    post = [p for p in acts.positions if p.startswith("t_post")]
    vectors = torch.stack([acts.diff(p) for p in post])  # [pos, layer, d]
    candidates = DimCandidates(
        vectors, tuple(post), acts.layers, len(acts.harmful), len(acts.harmless)
    )
    relaxed = dataclasses.replace(
        selection_config(config), max_kl=float("inf"), min_induce=float("-inf")
    )
    harmful, harmless = val_prompts(config)
    sel = select_refusal_direction(lm, candidates, harmful, harmless, relaxed, progress=progress)
    c = sel.carrier
    common = {
        "layer": c.layer,
        "carrier": "refusal",
        "source": "reextracted",
        "prompts": f"{harmful.name} vs {harmless.name}",
        "n": config.n_val,
    }
    return [
        {"metric": "bypass_score", "value": c.scores["bypass"], **common},
        {"metric": "induce_score", "value": c.scores["induce"], **common},
        {"metric": "selection_kl", "value": c.scores["kl"], **common},
    ]


def measure_checkpoint(
    lm: LoadedModel,
    reference: Reference,
    config: AuditConfig,
    *,
    base: LoadedModel,
    task: Task | None = None,
    anchors: Mapping[str, Reference] | None = None,
    progress: bool = True,
) -> Measured:
    """Measure one checkpoint against the base's :class:`Reference` (module docstring).

    Args:
        lm: the checkpoint (the base itself for step 0).
        reference: the base's carriers (:func:`~safegeom.audit.reference.build_reference`).
        config: what to measure (``families``, sizes, seed, ...).
        base: the base model (KL to the base).
        task: the trajectory's task; its held-out problems give ``task_accuracy``.
        anchors: further references by name (:mod:`~safegeom.audit.anchors`): the geometry rows
            again against each (``anchor`` = its name).
        progress: show progress bars.

    Returns:
        :class:`Measured`: rows of every family in ``config.families`` (each row passes
        :func:`~safegeom.audit.schema.frame`), seconds per phase, forward passes.

    Raises:
        ArtifactError: the checkpoint's hidden size differs from the reference's.
        SafegeomError: a layer the reference lacks, an empty prompt set.
        NonFiniteError: NaN or inf activations or scores.
    """
    anchors = dict(anchors or {})
    layers = _check(lm, {BASE_ANCHOR: reference, **anchors}, config)
    captured = sorted({*reference.layers, *(x for a in anchors.values() for x in a.layers)})
    seconds = dict.fromkeys(PHASES, 0.0)
    rows: list[dict[str, Any]] = []
    families = set(config.families)
    with _count_forwards(lm.model, base.model) as count:
        r_t = None
        if families & {"geometry", "causal"} or config.reselect:
            started = time.perf_counter()
            acts = capture_carriers(lm, config, tuple(captured), progress=progress)
            seconds["capture"] = time.perf_counter() - started
            started = time.perf_counter()
            geometry, carriers = geometry_rows(reference, acts, config, layers)
            r_t = carriers["refusal"]
            if "geometry" in families:
                rows += [{**row, "anchor": BASE_ANCHOR} for row in geometry]
                for name, anchor in anchors.items():
                    against, _ = geometry_rows(anchor, acts, config, layers)
                    rows += [{**row, "anchor": name} for row in against]
            seconds["carriers"] = time.perf_counter() - started
        if "geometry" in families and config.interference:
            started = time.perf_counter()
            rows += interference_rows(lm, reference, config, base=base, task=task)
            seconds["interference"] = time.perf_counter() - started
        if "causal" in families and r_t is not None:
            started = time.perf_counter()
            rows += causal_rows(lm, reference, r_t, config, progress=progress)
            seconds["causal"] = time.perf_counter() - started
        if "behaviour" in families:
            behaviour, spent = behaviour_rows(
                lm,
                config,
                base=base,
                task=task,
                generate_text=config.generate,
                progress=progress,
            )
            rows += behaviour
            seconds["generation"] += spent["generation"]
            seconds["scoring"] += spent["scoring"]
        if config.attacks:  # fixed-source transfer: each attack set replayed as optimised
            transfer, spent = transfer_rows(lm, config, progress=progress)
            rows += transfer
            seconds["generation"] += spent["generation"]
            seconds["scoring"] += spent["scoring"]
        if config.reselect:
            started = time.perf_counter()
            rows += _reselect_rows(lm, acts, config, progress)
            seconds["reselect"] = time.perf_counter() - started
    frame({**row, "checkpoint": "check", "step": 0} for row in rows)  # every row fits the schema
    return Measured(rows=tuple(rows), seconds=MappingProxyType(seconds), forward_passes=count[0])
