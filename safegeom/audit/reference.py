"""The base model's carriers, computed once per audit and saved beside it: :class:`Reference`.

- r₀: the standard refusal-direction selection on the base (docs/methods.md §1), with the audit's
  carrier sets as training prompts and its validation sets. When no candidate passes the KL and
  induce filters, the lowest-bypass candidate with those filters off is used (as the demo does) and
  the provenance says so (``filters_passed: false``, ``filters_note``). When no prompt survives the
  refusal-score data filter (a model that never refuses), the selection runs without it and the
  provenance says so (``filter_train: false``).
- Every other registered carrier type (:data:`~safegeom.carriers.registry.CARRIER_TYPES`) fitted at
  r₀'s layer by its fit function: h₀, diff-in-means at ``t_inst`` (§2); B₀, the cheap cone with
  ``k = cone_k`` (§3); and any type registered since. They come from the audit's own capture of the
  carrier prompts on the base (:func:`~safegeom.audit.activations.capture_carriers`), the same pass
  every checkpoint gets.
- Per layer: every carrier refitted (the refusal direction as diff-in-means at r₀'s position), the
  step-0 side of every per-layer drift.

On disk (``Reference.save(folder)``): every carrier as ``NAME.safetensors`` + ``.json``,
``layers.safetensors`` (the per-layer tensors by name, float64), ``candidates.parquet`` (the
selection's score table) and ``reference.json`` (format, carrier names, layers, provenance). A
reference saved before the names were listed holds ``refusal``, ``harmfulness`` and ``cone``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

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
from safegeom.audit.activations import (
    CarrierActivations,
    capture_carriers,
    carrier_prompts,
    layer_inputs,
    refit,
)
from safegeom.audit.config import AuditConfig
from safegeom.carriers.carrier import Carrier, load_carrier
from safegeom.carriers.refusal import (
    RefusalSelection,
    SelectionConfig,
    passes_filters,
    refusal_direction,
)
from safegeom.carriers.registry import CARRIER_TYPES, CarrierType
from safegeom.config import config_dict
from safegeom.errors import (
    ArtifactError,
    ConfigError,
    NonFiniteError,
    NotFoundError,
    SafegeomError,
)
from safegeom.frozen import Picklable
from safegeom.models.loading import LoadedModel
from safegeom.models.positions import parse_layers
from safegeom.prompts import combine_prompts

__all__ = ["DEFAULT_CARRIERS", "FORMAT", "Reference", "build_reference", "load_reference"]

FORMAT = "safegeom.audit_reference/1"
"""Format tag of ``reference.json``."""


DEFAULT_CARRIERS = ("refusal", "harmfulness", "cone")
"""The carriers of a reference saved before ``reference.json`` listed them."""


@dataclass(frozen=True, eq=False)
class Reference(Picklable):
    """The base's carriers by name (r₀, h₀, B₀, ...) and each one refitted at every layer."""

    carriers: Mapping[str, Carrier]
    """Carriers at r₀'s layer by name: ``refusal`` (r₀, the selected raw diff-in-means),
    ``harmfulness`` (h₀), ``cone`` (B₀, orthonormal ``[k, d]``) and other registered types."""
    layers: tuple[int, ...]
    """Layers of the per-layer tensors (the audited layers and r₀'s)."""
    layer_vectors: Mapping[str, Tensor]
    """Per carrier, the base's fit at every layer (float64): ``[layer, d]`` for a direction,
    ``[layer, k, d]`` orthonormal rows for a subspace (zeros where undefined, e.g. the cone at the
    embedding layer, whose ``t_post`` activations are the same for every prompt)."""
    candidates: pd.DataFrame = field(default_factory=pd.DataFrame)
    """The selection's candidate table (position, layer, bypass, induce, kl, norm, kept, reason)."""
    provenance: Provenance = field(default_factory=Provenance)
    """Model, weight hash, prompt sets, the config and how r₀ was selected."""

    def __post_init__(self) -> None:
        if "refusal" not in self.carriers:
            raise ConfigError(
                "an audit reference needs its refusal carrier: pass carriers['refusal']"
            )
        if set(self.layer_vectors) != set(self.carriers):
            raise ConfigError(
                f"per-layer vectors for {sorted(self.layer_vectors)} but carriers "
                f"{sorted(self.carriers)}; give layer_vectors for every carrier"
            )
        object.__setattr__(self, "carriers", MappingProxyType(dict(self.carriers)))
        object.__setattr__(self, "layer_vectors", MappingProxyType(dict(self.layer_vectors)))

    def carrier(self, name: str) -> Carrier:
        """The base carrier called ``name``.

        Raises:
            NotFoundError: the reference has none (the message lists what it holds).
        """
        if name not in self.carriers:
            raise NotFoundError(
                f"the audit reference has no {name!r} carrier (it holds "
                f"{', '.join(self.carriers)}); rebuild it with that type registered"
            )
        return self.carriers[name]

    @property
    def refusal(self) -> Carrier:
        """r₀: the selected refusal direction (raw diff-in-means)."""
        return self.carrier("refusal")

    @property
    def harmfulness(self) -> Carrier:
        """h₀: diff-in-means at ``t_inst`` at r₀'s layer."""
        return self.carrier("harmfulness")

    @property
    def cone(self) -> Carrier:
        """B₀: cheap cone (orthonormal ``[k, d]``) at r₀'s layer."""
        return self.carrier("cone")

    @property
    def refusal_layers(self) -> Float[Tensor, "layer d"]:
        """Base refusal diff-in-means at r₀'s position, per layer (float64)."""
        return self.layer_vectors["refusal"]

    @property
    def harmfulness_layers(self) -> Float[Tensor, "layer d"]:
        """Base harmfulness diff-in-means at ``t_inst``, per layer (float64)."""
        return self.layer_vectors["harmfulness"]

    @property
    def cone_layers(self) -> Float[Tensor, "layer k d"]:
        """Base cheap cone per layer (float64 orthonormal rows; zeros where undefined)."""
        return self.layer_vectors["cone"]

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
        for name, carrier in self.carriers.items():
            carrier.save(out / name)
        tensors = {name: v.double().contiguous() for name, v in self.layer_vectors.items()}
        save_safetensors(out / "layers.safetensors", tensors, {"layers": list(self.layers)})
        save_parquet(out / "candidates.parquet", self.candidates)
        meta = {
            "format": FORMAT,
            "carriers": list(self.carriers),
            "layers": list(self.layers),
            "provenance": self.provenance.to_dict(),
        }
        write_json(out / "reference.json", meta)
        return out


def load_reference(folder: str | os.PathLike[str]) -> Reference:
    """Read a reference written by :meth:`Reference.save` (also one saved before the carrier
    names were listed).

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
    names = list(meta.get("carriers", DEFAULT_CARRIERS))
    tensors, _ = read_safetensors(src / "layers.safetensors", what="audit reference layers")
    if set(tensors) != set(names):
        raise ArtifactError(f"{src / 'layers.safetensors'} lacks the per-layer tensors")
    table_path = src / "candidates.parquet"
    if not table_path.is_file():
        raise NotFoundError(f"no candidate table at {table_path}")
    try:
        candidates = pd.read_parquet(table_path)
    except Exception as err:  # pyarrow raises several kinds for a damaged file
        raise ArtifactError(f"{table_path} is not a readable candidate table ({err})") from None
    return Reference(
        carriers={name: load_carrier(src / f"{name}.safetensors") for name in names},
        layers=tuple(int(x) for x in meta["layers"]),
        layer_vectors={name: tensors[name] for name in names},
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
    ok = table[passes_filters(table, strict)]
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
        scores = {
            **carrier.scores,
            "bypass": float(row.bypass),
            "induce": float(row.induce),
            "kl": float(row.kl),
        }
        carrier = dataclasses.replace(
            carrier,
            vectors=vectors[pick],
            layer=int(row.layer),
            position=str(row.position),
            scores=scores,
        )
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
    carriers = {"refusal": r0}
    for name, ctype in CARRIER_TYPES.items():
        if name not in carriers:
            carriers[name] = _fit_at(acts, ctype, r0.layer, config.cone_k, provenance)
    return Reference(
        carriers=carriers,
        layers=layers,
        layer_vectors={
            name: _per_layer(acts, name, c.position, c.k, layers) for name, c in carriers.items()
        },
        candidates=selection.table,
        provenance=provenance,
    )


def _fit_at(
    acts: CarrierActivations, ctype: CarrierType, layer: int, k: int, provenance: Provenance
) -> Carrier:
    """A registered type fitted at r₀'s layer; a fit recording what it was made from (the cone's
    sources) carries that as its provenance's extras in place of the audit's.

    Raises:
        SafegeomError: the carrier is undefined there (e.g. a cone spanning fewer than k
            dimensions).
    """
    try:
        fitted = ctype.fit(layer_inputs(acts, layer, ctype.position, k))
    except SafegeomError as err:
        raise SafegeomError(
            f"the {ctype.name} carrier at r0's layer {layer} is undefined ({err}); lower --cone-k"
        ) from None
    if fitted.extra:
        provenance = dataclasses.replace(provenance, extra={})
    return ctype.carrier(fitted, layer, provenance)


def _per_layer(
    acts: CarrierActivations,
    name: str,
    position: str,
    k: int,
    layers: Sequence[int],
) -> Tensor:
    """The base's fit of carrier ``name`` at every layer, stacked (zeros where undefined)."""
    fits = [refit(acts, name, layer, position, k) for layer in layers]
    shape = next(f.vectors.shape for f in fits if f is not None)  # r₀'s layer has one
    zeros = torch.zeros(shape, dtype=torch.float64)
    return torch.stack([f.vectors if f is not None else zeros for f in fits])
