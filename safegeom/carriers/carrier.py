"""The :class:`Carrier` value: a direction or orthonormal basis with where and how it was found.

On disk a carrier is ``NAME.safetensors`` (the vectors, plus the unnormalised direction where
there is one) and ``NAME.json`` (site, layer, position, method, scores, provenance). Loading
checks the hidden size against a model and warns when the model's weight hash differs.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file
from torch import Tensor

from safegeom.activations import atomic_save_safetensors

__all__ = ["Carrier", "load_carrier"]

FORMAT = "safegeom.carrier/1"


@dataclass(frozen=True)
class Carrier:
    """A direction (``k = 1``) or subspace (``k > 1``) that carries a concept at one site.

    ``vectors`` is ``[k, d]``: for a diff-in-means direction the raw (unnormalised) difference of
    means, so its norm is meaningful for activation addition; for a basis, orthonormal rows.
    """

    vectors: Float[Tensor, "k d"]
    kind: str
    """What it carries: ``refusal`` or ``harmfulness``."""
    method: str
    """How it was found: ``dim``, ``probe``, ``cone-cheap``, ``rdo``, ``cone-rdo``, ``admissible``."""
    site: str = "resid_pre"
    layer: int = 0
    position: str = "t_post[-1]"
    scores: Mapping[str, float] = field(default_factory=dict)
    """The scores it was selected by (bypass, induce, KL, accuracy, ...)."""
    provenance: Mapping[str, Any] = field(default_factory=dict)
    """Model name and weight hash, prompt-set names and hashes, n per class."""

    def __post_init__(self) -> None:
        v = torch.as_tensor(self.vectors).detach().cpu().float()
        v = v[None] if v.dim() == 1 else v
        if v.dim() != 2 or v.shape[0] == 0:
            raise ValueError(f"carrier vectors must be [k, d], got {tuple(v.shape)}")
        if not torch.isfinite(v).all() or bool((v.norm(dim=-1) == 0).any()):
            raise ValueError("carrier vectors must be finite and non-zero")
        object.__setattr__(self, "vectors", v)

    @property
    def k(self) -> int:
        """Dimension of the carrier (1 for a direction)."""
        return int(self.vectors.shape[0])

    @property
    def d_model(self) -> int:
        """Hidden size."""
        return int(self.vectors.shape[1])

    @property
    def direction(self) -> Float[Tensor, " d"]:
        """The first vector, unnormalised (a DIM direction keeps its norm)."""
        return self.vectors[0]

    @property
    def unit(self) -> Float[Tensor, " d"]:
        """The first vector, unit norm."""
        return self.direction / self.direction.norm()

    @property
    def basis(self) -> Float[Tensor, "d k"]:
        """An orthonormal ``[d, k]`` basis of the carrier's span."""
        q, _ = torch.linalg.qr(self.vectors.double().T)
        return q.float()

    def with_scores(self, **scores: float) -> Carrier:
        """A copy with extra scores."""
        return replace(self, scores={**self.scores, **scores})

    def check_model(self, d_model: int, weight_hash: str | None = None) -> None:
        """Raise on a hidden-size mismatch; warn when the model's weights differ from the source.

        Raises:
            ValueError: ``d_model`` differs from the carrier's hidden size.
        """
        if d_model != self.d_model:
            raise ValueError(
                f"hidden-size mismatch: the carrier has d={self.d_model}, the model has "
                f"d={d_model}; extract the carrier on this model"
            )
        source = self.provenance.get("weight_hash")
        if weight_hash and source and weight_hash != source:
            warnings.warn(
                f"carrier was found on weights {source[:12]}…, the model is {weight_hash[:12]}…",
                stacklevel=2,
            )

    def _meta(self) -> dict[str, Any]:
        meta = asdict(self)
        meta.pop("vectors")
        return {"format": FORMAT, "k": self.k, "d_model": self.d_model, **meta}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path`` (``.safetensors`` added when missing) and its ``.json``; return the
        safetensors path."""
        target = Path(path)
        if target.suffix != ".safetensors":
            target = target.with_suffix(".safetensors")
        meta = self._meta()
        atomic_save_safetensors({"vectors": self.vectors}, target, {"safegeom": json.dumps(meta)})
        target.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        return target


def load_carrier(
    path: str | os.PathLike[str], *, d_model: int | None = None, weight_hash: str | None = None
) -> Carrier:
    """Read a carrier written by :meth:`Carrier.save`.

    Args:
        path: the ``.safetensors`` file (or the same path without suffix).
        d_model: when given, the hidden size the carrier must have.
        weight_hash: when given, compared with the source model's (a mismatch warns).

    Raises:
        FileNotFoundError: no carrier at ``path``.
        ValueError: not a safegeom carrier, or a hidden-size mismatch.
    """
    target = Path(path)
    if target.suffix != ".safetensors":
        target = target.with_suffix(".safetensors")
    if not target.is_file():
        raise FileNotFoundError(f"no carrier at {target}")
    sidecar = target.with_suffix(".json")
    meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{target} is not a safegeom carrier (format {meta.get('format')!r})")
    carrier = Carrier(
        vectors=load_file(target)["vectors"],
        kind=meta["kind"],
        method=meta["method"],
        site=meta["site"],
        layer=int(meta["layer"]),
        position=meta["position"],
        scores=meta.get("scores", {}),
        provenance=meta.get("provenance", {}),
    )
    if d_model is not None:
        carrier.check_model(d_model, weight_hash)
    return carrier
