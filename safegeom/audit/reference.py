"""The base model's carriers, computed once per audit and saved beside it: :class:`Reference`.

- r₀: the standard refusal-direction selection on the base (METHODS §1), with the audit's carrier
  sets as training prompts and its validation sets. When no candidate passes the KL and induce
  filters, the lowest-bypass candidate with those filters off is used (as the demo does) and the
  provenance says so (``filters_passed: false``, ``filters_note``). When no prompt survives the
  refusal-score data filter (a model that never refuses), the selection runs without it and the
  provenance says so (``filter_train: false``).
- h₀: diff-in-means at ``t_inst`` at r₀'s layer (§2); B₀: the cheap cone, ``k = cone_k``, at r₀'s
  layer (§3). Both come from the audit's own capture of the carrier prompts on the base
  (:func:`~safegeom.audit.geometry_rows.capture_carriers`), the same pass every checkpoint gets.
- Per layer: the base's refusal diff-in-means at r₀'s position, harmfulness diff-in-means at
  ``t_inst`` and cheap cone, the step-0 side of every per-layer drift.

On disk (``Reference.save(folder)``): ``refusal``/``harmfulness``/``cone`` carriers
(``.safetensors`` + ``.json``), ``layers.safetensors`` (the per-layer tensors, float64),
``candidates.parquet`` (the selection's score table) and ``reference.json`` (format, layers,
provenance).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from safegeom.artifacts import (
    Provenance,
    read_json,
    read_safetensors,
    save_parquet,
    save_safetensors,
    write_json,
)
from safegeom.audit.config import AuditConfig
from safegeom.audit.geometry_rows import capture_carriers, carrier_prompts, cone_at
from safegeom.carriers.carrier import Carrier, load_carrier
from safegeom.carriers.refusal import RefusalSelection, SelectionConfig, refusal_direction
from safegeom.config import config_dict
from safegeom.errors import ArtifactError, NonFiniteError, NotFoundError, SafegeomError
from safegeom.models.loading import LoadedModel
from safegeom.models.positions import parse_layers
from safegeom.prompts import combine_prompts

__all__ = ["FORMAT", "Reference", "build_reference", "load_reference"]

FORMAT = "safegeom.audit_reference/1"
"""Format tag of ``reference.json``."""


@dataclass(frozen=True, eq=False)
class Reference:
    """The base's carriers (r₀, h₀, B₀) and its per-layer directions and cones."""

    refusal: Carrier
    """r₀: the selected refusal direction (raw diff-in-means)."""
    harmfulness: Carrier
    """h₀: diff-in-means at ``t_inst`` at r₀'s layer."""
    cone: Carrier
    """B₀: cheap cone (orthonormal ``[k, d]``) at r₀'s layer."""
    layers: tuple[int, ...]
    """Layers of the per-layer tensors (the audited layers and r₀'s)."""
    refusal_layers: Float[Tensor, "layer d"]
    """Base refusal diff-in-means at r₀'s position, per layer (float64)."""
    harmfulness_layers: Float[Tensor, "layer d"]
    """Base harmfulness diff-in-means at ``t_inst``, per layer (float64)."""
    cone_layers: Float[Tensor, "layer k d"]
    """Base cheap cone per layer (float64 orthonormal rows; zeros where undefined, e.g. the
    embedding layer, whose ``t_post`` activations are the same for every prompt)."""
    candidates: pd.DataFrame = field(default_factory=pd.DataFrame)
    """The selection's candidate table (position, layer, bypass, induce, kl, norm, kept, reason)."""
    provenance: Provenance = field(default_factory=Provenance)
    """Model, weight hash, prompt sets, the config and how r₀ was selected."""

    def layer_index(self, layer: int) -> int:
        """Row of ``layer`` in the per-layer tensors.

        Raises:
            SafegeomError: the layer is not in the reference (it was built for other layers).
        """
        if layer not in self.layers:
            raise SafegeomError(
                f"the reference has no layer {layer} (it holds {list(self.layers)}); rebuild it "
                "with these layers"
            )
        return self.layers.index(layer)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the reference into ``folder`` (see the module docstring), every file atomically.

        Returns:
            The folder.
        """
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("refusal", "harmfulness", "cone"):
            getattr(self, name).save(out / name)
        tensors = {
            "refusal": self.refusal_layers.double().contiguous(),
            "harmfulness": self.harmfulness_layers.double().contiguous(),
            "cone": self.cone_layers.double().contiguous(),
        }
        save_safetensors(out / "layers.safetensors", tensors, {"layers": list(self.layers)})
        save_parquet(out / "candidates.parquet", self.candidates)
        meta = {"format": FORMAT, "layers": list(self.layers),
                "provenance": self.provenance.to_dict()}  # fmt: skip
        write_json(out / "reference.json", meta)
        return out


def load_reference(folder: str | os.PathLike[str]) -> Reference:
    """Read a reference written by :meth:`Reference.save`.

    Returns:
        The :class:`Reference`.

    Raises:
        NotFoundError: no such folder, or a file missing.
        ArtifactError: a file truncated or of another kind.
    """
    src = Path(folder)
    if not src.is_dir():
        raise NotFoundError(f"no saved audit reference at {src} (not a folder)")
    meta = read_json(src / "reference.json", what="audit reference")
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{src / 'reference.json'} is not a safegeom audit reference")
    tensors, _ = read_safetensors(src / "layers.safetensors", what="audit reference layers")
    if set(tensors) != {"refusal", "harmfulness", "cone"}:
        raise ArtifactError(f"{src / 'layers.safetensors'} lacks the per-layer tensors")
    table_path = src / "candidates.parquet"
    if not table_path.is_file():
        raise NotFoundError(f"no candidate table at {table_path}")
    try:
        candidates = pd.read_parquet(table_path)
    except Exception as err:  # pyarrow raises several kinds for a damaged file
        raise ArtifactError(f"{table_path} is not a readable candidate table ({err})") from None
    return Reference(
        refusal=load_carrier(src / "refusal.safetensors"),
        harmfulness=load_carrier(src / "harmfulness.safetensors"),
        cone=load_carrier(src / "cone.safetensors"),
        layers=tuple(int(x) for x in meta["layers"]),
        refusal_layers=tensors["refusal"],
        harmfulness_layers=tensors["harmfulness"],
        cone_layers=tensors["cone"],
        candidates=candidates,
        provenance=Provenance.from_dict(meta.get("provenance", {})),
    )


def selection_config(config: AuditConfig) -> SelectionConfig:
    """The :class:`SelectionConfig` of r₀: ``n_train = n_per_class``, ``n_val``, batch size and
    system prompt from ``config``; other settings at their defaults (Arditi et al.)."""
    return SelectionConfig(
        n_train=config.n_per_class,
        n_val=config.n_val,
        batch_size=config.batch_size or 64,
        system=config.system,
    )


def _select(
    lm: LoadedModel, config: AuditConfig, progress: bool
) -> tuple[RefusalSelection, Carrier, dict]:
    """Run the selection once with the KL/induce filters off, then apply them to its table:
    the same pick as the standard selection when a candidate passes, the relaxed pick otherwise
    (one scoring pass either way)."""
    strict = selection_config(config)
    relaxed = dataclasses.replace(strict, max_kl=float("inf"), min_induce=float("-inf"))
    harmful, harmless = carrier_prompts(config)
    val = (combine_prompts(config.harmful_val), combine_prompts(config.harmless_val))
    how: dict = {"filter_train": True}
    try:
        selection = refusal_direction(lm, harmful, harmless, *val, relaxed, progress=progress)
    except NonFiniteError:
        raise
    except SafegeomError as err:
        if "refusal-score filter" not in str(err):
            raise
        how = {"filter_train": False, "filter_train_note": str(err)}
        relaxed = dataclasses.replace(relaxed, filter_train=False)
        selection = refusal_direction(lm, harmful, harmless, *val, relaxed, progress=progress)
    table = selection.table
    ok = table[
        table["kept"] & (table["kl"] <= strict.max_kl) & (table["induce"] >= strict.min_induce)
    ]
    carrier = selection.carrier
    if ok.empty:
        how |= {
            "filters_passed": False,
            "filters_note": (
                f"no refusal-direction candidate passes the KL (≤ {strict.max_kl}) and induce "
                f"(≥ {strict.min_induce}) filters; using the lowest-bypass candidate with those "
                f"filters off (layer {carrier.layer} {carrier.position})"
            ),
        }
    else:
        how["filters_passed"] = True
        pick = ok.sort_values("bypass").index[0]
        row = table.loc[pick]
        assert selection.candidates is not None
        vectors, _, _ = selection.candidates.flat()
        scores = {**carrier.scores, "bypass": float(row.bypass), "induce": float(row.induce),
                  "kl": float(row.kl)}  # fmt: skip
        carrier = dataclasses.replace(
            carrier, vectors=vectors[pick], layer=int(row.layer), position=str(row.position),
            scores=scores,
        )  # fmt: skip
    return selection, carrier, how


def build_reference(lm: LoadedModel, config: AuditConfig, *, progress: bool = True) -> Reference:
    """Select r₀ on the base and extract h₀, B₀ and the per-layer base carriers.

    Returns:
        The :class:`Reference`; its provenance holds the model and weight hash, the carrier and
        validation sets, the audit config, the selection's cost and whether the filters passed.

    Raises:
        SafegeomError: an empty prompt set, a layer out of range, a cone_k the sources cannot
            span, or no candidate at all (every one zero or above the layer fraction).
        NonFiniteError: the base's refusal scores or activations are NaN or inf.
    """
    selection, r0, how = _select(lm, config, progress)
    layers = tuple(sorted({*parse_layers(config.layers, lm.n_layers), r0.layer}))
    acts = capture_carriers(lm, config, layers, progress=progress)
    refusal_layers, harmfulness_layers = acts.diff(r0.position), acts.diff("t_inst")
    cones = [cone_at(acts, layer, config.cone_k) for layer in layers]
    at = layers.index(r0.layer)
    harmful, harmless = carrier_prompts(config)
    provenance = Provenance(
        model=lm.name,
        weight_hash=lm.weight_hash,
        prompt_sets={
            **r0.provenance.prompt_sets,
            harmful.name: harmful.content_hash,
            harmless.name: harmless.content_hash,
        },
        config=config_dict(config),
        extra={
            **how,
            "carrier_sets": acts.name,
            "n_per_class": [len(acts.harmful), len(acts.harmless)],
            "selection_forward_passes": selection.n_forward_passes,
            "selection_seconds": selection.seconds,
        },
    )
    cone_prov = dataclasses.replace(
        provenance, extra={"source": "positions", "n_svd": config.cone_k}
    )
    h0 = Carrier(
        vectors=harmfulness_layers[at], kind="harmfulness", method="dim", layer=r0.layer,
        position="t_inst", scores={"norm": float(harmfulness_layers[at].norm())},
        provenance=provenance,
    )  # fmt: skip
    basis, rank = cones[at]
    if basis is None:
        raise SafegeomError(
            f"the cheap cone at r0's layer {r0.layer} is undefined: its sources span fewer than "
            f"cone_k={config.cone_k} dimensions; lower --cone-k"
        )
    post_last = [p for p in acts.positions if p.startswith("t_post")][-1]
    alpha = float(acts.diff(post_last)[at].norm())
    b0 = Carrier(
        vectors=basis, kind="refusal", method="cone-cheap", layer=r0.layer, position="t_post",
        scores={"alpha": alpha, "effective_rank": rank}, provenance=cone_prov,
    )  # fmt: skip
    return Reference(
        refusal=r0,
        harmfulness=h0,
        cone=b0,
        layers=layers,
        refusal_layers=refusal_layers,
        harmfulness_layers=harmfulness_layers,
        cone_layers=torch.stack(
            [
                c if c is not None else torch.zeros(config.cone_k, lm.d_model, dtype=torch.float64)
                for c, _ in cones
            ]
        ),
        candidates=selection.table,
        provenance=provenance,
    )
