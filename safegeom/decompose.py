"""Where a projection comes from: the residual stream on a direction, split by what wrote it.

The input of block ``L`` is the token embedding plus everything the attention and MLP of blocks
``0 … L-1`` wrote (the layout's writer modules, so post-norm architectures such as Gemma-2 add up
too). Projecting each term on a unit direction r̂ splits ``resid_pre[L] · r̂`` into per-component
contributions, per prompt. Comparing two populations (harmful and harmless prompts) shows whether a
diff-in-means direction is carried by a feature one class *adds* (one-sided: the other class sits
near zero) or by a large shared vector that one class shrinks (two-sided), and which layer writes
it. This is how the tied-embedding ``tiny-chat`` was diagnosed (its model card, "Refusal geometry").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from safegeom.activations import CaptureConfig, capture
from safegeom.carriers.carrier import Carrier
from safegeom.errors import SafegeomError
from safegeom.models.loading import LoadedModel
from safegeom.prompts import PromptSet

__all__ = ["ProjectionDecomposition", "decompose_projection"]


@dataclass(frozen=True)
class ProjectionDecomposition:
    """Per-component projections of ``resid_pre[layer]`` on a unit direction.

    ``table`` has one row per population and component: ``population``, ``component`` (``embed``,
    ``attn L``, ``mlp L``, then ``total``), ``layer`` (−1 for the embedding and the total),
    ``mean`` and ``std`` of the projection over prompts (in residual-stream units along r̂), and
    ``n``. ``provenance`` names the model, its weight hash, the direction's norm and each
    population's prompt hash. ``closure`` is, per population, the largest ``|total − Σ components|`` over prompts
    (float64; ≈ 0 when the layout's writers are exactly what the residual stream adds).
    """

    table: pd.DataFrame
    layer: int
    position: str
    closure: dict[str, float]
    provenance: dict = field(default_factory=dict)

    def means(self) -> pd.DataFrame:
        """Mean projection as a ``component × population`` table, components in stream order."""
        wide = self.table.pivot(index="component", columns="population", values="mean")
        return wide.loc[list(dict.fromkeys(self.table.component))]


def _vector(direction: Tensor | Carrier, d_model: int) -> Float[Tensor, " d"]:
    """The direction as a float64 CPU vector, checked against the model width."""
    v = direction.direction if isinstance(direction, Carrier) else torch.as_tensor(direction)
    v = v.detach().double().flatten().cpu()
    if v.numel() != d_model:
        raise SafegeomError(
            f"direction has {v.numel()} entries but the model's hidden size is {d_model}"
        )
    if not torch.isfinite(v.norm()) or v.norm() == 0:
        raise SafegeomError("direction must be finite and non-zero")
    return v


def _capture_spec(position: str) -> str:
    """The capture spec that yields ``position`` (``t_post[-k]`` labels come from ``t_post``)."""
    return "t_post" if position.startswith("t_post[") else position


def decompose_projection(
    lm: LoadedModel,
    direction: Tensor | Carrier,
    populations: Mapping[str, PromptSet | str | Sequence[str]],
    *,
    layer: int | None = None,
    position: str | None = None,
    system: str | None = None,
    progress: bool = True,
) -> ProjectionDecomposition:
    """Split the projection of ``resid_pre[layer]`` at ``position`` on ``direction`` by component.

    Args:
        lm: a loaded model.
        direction: a vector ``[d]`` or a :class:`Carrier` (its first vector; its layer and position
            are the defaults).
        populations: label → prompts, e.g. ``{"harmful": "advbench:train", "harmless": ...}``.
        layer: block whose input is decomposed (0 … n_layers − 1).
        position: a position label as captured (``t_post[-3]``, ``t_inst``, ``last``, an offset).
        system: optional system prompt.
        progress: show capture progress bars.

    Returns:
        :class:`ProjectionDecomposition` (projections in residual-stream units along r̂).

    Raises:
        SafegeomError: no population, a hidden-size mismatch, a zero direction, a layer out of range,
            or a position the capture does not produce.
    """
    if not populations:
        raise SafegeomError("no population given: pass e.g. {'harmful': ..., 'harmless': ...}")
    vector = _vector(direction, lm.d_model)
    unit = vector / vector.norm()
    carrier = direction if isinstance(direction, Carrier) else None
    layer = carrier.layer if layer is None and carrier is not None else layer
    position = carrier.position if position is None and carrier is not None else position
    if layer is None or position is None:
        raise SafegeomError("layer and position are required when the direction is a plain tensor")
    if not 0 <= layer < lm.n_layers:
        raise SafegeomError(f"layer {layer} is out of range for a model with {lm.n_layers} layers")
    rows: list[dict] = []
    closure: dict[str, float] = {}
    prompt_hashes: dict[str, str] = {}
    for label, prompts in populations.items():
        acts = capture(
            lm,
            prompts,
            CaptureConfig(
                sites="resid_pre,attn_out,mlp_out",
                layers=list(range(layer + 1)),
                positions=_capture_spec(str(position)),
                system=system,
            ),
            progress=progress,
        )
        if str(position) not in acts.positions:
            raise SafegeomError(f"position {position!r} not captured; available: {acts.positions}")
        k = acts.positions.index(str(position))
        prompt_hashes[label] = next(iter(acts.provenance.prompt_sets.values()), "")
        parts = {"embed": (-1, acts["resid_pre"][:, 0, k])}
        for j in range(layer):
            parts[f"attn {j}"] = (j, acts["attn_out"][:, j, k])
            parts[f"mlp {j}"] = (j, acts["mlp_out"][:, j, k])
        projections = {name: (j, x.double() @ unit) for name, (j, x) in parts.items()}
        total = acts["resid_pre"][:, layer, k].double() @ unit
        summed = torch.stack([p for _, p in projections.values()]).sum(0)
        closure[label] = float((total - summed).abs().max())
        for name, (j, p) in {**projections, "total": (-1, total)}.items():
            rows.append(
                {
                    "population": label,
                    "component": name,
                    "layer": j,
                    "mean": float(p.mean()),
                    "std": float(p.std(correction=0)),
                    "n": int(p.numel()),
                }
            )
    provenance = {
        "model": lm.name,
        "weight_hash": lm.weight_hash,
        "direction_norm": float(vector.norm()),
        "prompt_hashes": prompt_hashes,
    }
    return ProjectionDecomposition(pd.DataFrame(rows), layer, str(position), closure, provenance)
