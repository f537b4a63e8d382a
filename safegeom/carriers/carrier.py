"""The :class:`Carrier` value: a direction or orthonormal basis with where and how it was found.

On disk a carrier is ``NAME.safetensors`` (the vectors; its header holds the metadata: site,
layer, position, method, scores, provenance) and a ``NAME.json`` sidecar with the same metadata
for people to read. Loading reads the header, so a ``.safetensors`` copied without its sidecar
loads the same. Loading checks the hidden size against a model and warns when the model's weight
hash differs.

A carrier names where it acts: ``layer`` and ``position`` are required (there is no silent layer 0).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from safegeom.artifacts import Provenance, read_safetensors, save_safetensors, write_json
from safegeom.errors import ArtifactError, ConfigError, NonFiniteError

__all__ = ["Carrier", "carrier_from_metadata", "load_carrier"]

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
    layer: int
    """The block it was found at (required: a carrier names its layer; there is no default)."""
    position: str
    """The token position it was read at, e.g. ``t_post[-1]`` or ``t_inst`` (required)."""
    site: str = "resid_pre"
    """The hook site it was read at (``resid_pre``: the block input)."""
    scores: Mapping[str, float] = field(default_factory=dict)
    """The scores it was selected by (bypass, induce, KL, accuracy, ...)."""
    provenance: Provenance = field(default_factory=Provenance)
    """Model name and weight hash, prompt-set names and hashes, n per class (a plain mapping is
    turned into a :class:`~safegeom.artifacts.Provenance`)."""

    def __post_init__(self) -> None:
        if self.position is None:
            raise ConfigError(
                "a Carrier must name where it was found: pass position= (e.g. position='t_post[-1]')"
            )
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise ConfigError(f"Carrier layer must be a block index (int), got {self.layer!r}")
        v = torch.as_tensor(self.vectors).detach().cpu().float()
        v = v[None] if v.dim() == 1 else v
        if v.dim() != 2 or v.shape[0] == 0:
            raise ConfigError(f"carrier vectors must be [k, d], got {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise NonFiniteError("carrier vectors must be finite and non-zero (they hold NaN/inf)")
        if bool((v.norm(dim=-1) == 0).any()):
            raise ConfigError("carrier vectors must be finite and non-zero")
        object.__setattr__(self, "vectors", v)
        if not isinstance(self.provenance, Provenance):
            prov = Provenance.from_dict(dict(self.provenance))
            object.__setattr__(self, "provenance", prov)

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
            ArtifactError: ``d_model`` differs from the carrier's hidden size.
        """
        if d_model != self.d_model:
            raise ArtifactError(
                f"hidden-size mismatch: the carrier has d={self.d_model}, the model has "
                f"d={d_model}; extract the carrier on this model"
            )
        source = self.provenance.get("weight_hash")
        if weight_hash and source and weight_hash != source:
            warnings.warn(
                f"carrier was found on weights {source[:12]}…, the model is {weight_hash[:12]}…",
                stacklevel=2,
            )

    def metadata(self) -> dict[str, Any]:
        """The JSON-ready metadata saved beside the vectors (format, k, d_model and every field
        but ``vectors``; provenance as :meth:`Provenance.to_dict`)."""
        return {
            "format": FORMAT,
            "k": self.k,
            "d_model": self.d_model,
            "kind": self.kind,
            "method": self.method,
            "site": self.site,
            "layer": self.layer,
            "position": self.position,
            "scores": dict(self.scores),
            "provenance": self.provenance.to_dict(),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path`` (``.safetensors`` added when missing, metadata in its header) and the
        ``.json`` sidecar, both atomically.

        Returns:
            The safetensors path.
        """
        target = _safetensors_path(path)
        meta = self.metadata()
        save_safetensors(target, {"vectors": self.vectors}, meta)
        write_json(target.with_suffix(".json"), meta)
        return target


def _safetensors_path(path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    return target if target.suffix == ".safetensors" else target.with_suffix(".safetensors")


def carrier_from_metadata(vectors: Tensor, meta: Mapping[str, Any], where: object) -> Carrier:
    """Rebuild a carrier from its vectors and :meth:`Carrier.metadata`.

    Returns:
        The :class:`Carrier`.

    Raises:
        ArtifactError: ``meta`` is not a safegeom carrier's (the message names ``where``).
    """
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{where} is not a safegeom carrier (format {meta.get('format')!r})")
    try:
        return Carrier(
            vectors=vectors,
            kind=meta["kind"],
            method=meta["method"],
            site=meta["site"],
            layer=int(meta["layer"]),
            position=meta["position"],
            scores=meta.get("scores", {}),
            provenance=Provenance.from_dict(meta.get("provenance", {})),
        )
    except (KeyError, TypeError) as err:
        raise ArtifactError(f"{where}: carrier metadata lacks {err}") from None


def load_carrier(
    path: str | os.PathLike[str], *, d_model: int | None = None, weight_hash: str | None = None
) -> Carrier:
    """Read a carrier written by :meth:`Carrier.save` (the sidecar is not needed: the
    safetensors header holds the same metadata).

    Args:
        path: the ``.safetensors`` file (or the same path without suffix).
        d_model: when given, the hidden size the carrier must have.
        weight_hash: when given, compared with the source model's (a mismatch warns).

    Returns:
        The :class:`Carrier`.

    Raises:
        NotFoundError: no carrier at ``path``.
        ArtifactError: a truncated or foreign file, not a safegeom carrier, or a hidden-size
            mismatch (each message names the file).
    """
    target = _safetensors_path(path)
    tensors, meta = read_safetensors(target, what="carrier")
    if "vectors" not in tensors:
        raise ArtifactError(f"{target} is not a safegeom carrier (no 'vectors' tensor)")
    carrier = carrier_from_metadata(tensors["vectors"], meta, target)
    if d_model is not None:
        try:
            carrier.check_model(d_model, weight_hash)
        except ArtifactError as err:
            raise ArtifactError(f"{target}: {err}") from None
    return carrier
