"""Captured activations and their statistics as values that save and load with provenance.

On disk an :class:`Activations` is one safetensors file (one tensor per site, shaped
``[n_prompts, n_layers, n_positions, d]``) plus a JSON sidecar (``<file>.json``) holding the
layers, position labels and :class:`~safegeom.artifacts.Provenance`. The same JSON is also in the
safetensors metadata, so the tensor file alone is self-describing. A sharded capture is a folder
of ``shard-NNNNN.safetensors`` files plus ``activations.json``; :func:`load_activations` reads
either form (and files written before the typed provenance).

An :class:`ActivationStats` (float64 means, optionally covariances, per site) is one safetensors
file (tensors ``{site}.mean`` and ``{site}.cov``) with the same kind of sidecar.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from safegeom.artifacts import (
    Provenance,
    read_json,
    read_safetensors,
    save_safetensors,
    write_json,
)
from safegeom.errors import ArtifactError, NotFoundError, SafegeomError
from safegeom.stats import Moments

__all__ = [
    "ActivationStats",
    "Activations",
    "load_activations",
]

FORMAT = "safegeom.activations.values/1"
STATS_FORMAT = "safegeom.activation_stats/1"
SHARD_INDEX = "activations.json"


def _provenance(data: Mapping[str, Any]) -> Provenance:
    """Typed provenance from a saved mapping; files from before ``prompt_sets`` are upgraded."""
    values = dict(data)
    if "prompt_sets" not in values and "prompt_set" in values:
        name, digest = values.pop("prompt_set"), values.pop("prompt_hash", "")
        values["prompt_sets"] = {name: digest}
    return Provenance.from_dict(values)


@dataclass(frozen=True)
class Activations:
    """Activations at (site, layer, position) for a prompt set.

    ``data[site]`` has shape ``[n_prompts, n_layers, n_positions, d]`` and is on the CPU; layer
    ``layers[j]`` is at index ``j`` and position ``positions[k]`` at index ``k``.
    """

    data: Mapping[str, Float[Tensor, "n layer pos d"]]
    layers: tuple[int, ...]
    positions: tuple[str, ...]
    provenance: Provenance

    def __getitem__(self, site: str) -> Float[Tensor, "n layer pos d"]:
        if site not in self.data:
            raise NotFoundError(f"site {site!r} was not captured; captured: {sorted(self.data)}")
        return self.data[site]

    @property
    def sites(self) -> tuple[str, ...]:
        """Captured sites."""
        return tuple(self.data)

    @property
    def n_prompts(self) -> int:
        """Number of prompts."""
        return int(next(iter(self.data.values())).shape[0])

    def layer_index(self, layer: int) -> int:
        """Index of model layer ``layer`` in the layer axis (negative layers count from the end
        of the *captured* layers)."""
        if layer < 0 and -len(self.layers) <= layer:
            return range(len(self.layers))[layer]
        if layer not in self.layers:
            raise SafegeomError(f"layer {layer} was not captured; captured: {list(self.layers)}")
        return self.layers.index(layer)

    def position_index(self, position: str) -> int:
        """Index of a position label (``t_inst``, ``t_post[-1]``, ``last``, ``offset[-3]``)."""
        if position not in self.positions:
            raise SafegeomError(
                f"position {position!r} not captured; captured: {list(self.positions)}"
            )
        return self.positions.index(position)

    def select(self, site: str, layer: int, position: str) -> Float[Tensor, "n d"]:
        """Activations of every prompt at one site, layer and position."""
        return self[site][:, self.layer_index(layer), self.position_index(position)]

    def _meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "layers": list(self.layers),
            "positions": list(self.positions),
            "provenance": self.provenance.to_dict(),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path`` (safetensors) and ``path.json`` (sidecar) atomically; return ``path``."""
        target = Path(path)
        meta = self._meta()
        save_safetensors(target, self.data, meta)
        write_json(Path(f"{target}.json"), meta)
        return target


def _from_meta(data: dict[str, Tensor], meta: Mapping[str, Any], where: Path) -> Activations:
    if meta.get("format") != FORMAT:
        raise ArtifactError(
            f"{where} is not a safegeom activations file (format {meta.get('format')!r})"
        )
    return Activations(
        data=data,
        layers=tuple(meta["layers"]),
        positions=tuple(meta["positions"]),
        provenance=_provenance(meta["provenance"]),
    )


def _read_shard(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise NotFoundError(f"no activations shard at {path}; the capture folder is incomplete")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise ArtifactError(f"{path} is not a readable activations shard ({err})") from None


def load_activations(path: str | os.PathLike[str]) -> Activations:
    """Read activations written by :meth:`Activations.save` or a sharded capture folder.

    Returns:
        The :class:`Activations`, in input order, with their provenance.

    Raises:
        NotFoundError: nothing at ``path``.
        ArtifactError: the file is not a readable safegeom activations file.
    """
    target = Path(path)
    if target.is_dir():
        index = read_json(target / SHARD_INDEX, what="activations index")
        parts = [_read_shard(target / name) for name in index["shards"]]
        order = torch.cat([p.pop("prompt_index") for p in parts])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        data = {site: torch.cat([p[site] for p in parts])[inverse] for site in index["sites"]}
        return _from_meta(data, index, target)
    tensors, meta = read_safetensors(target, what="activations")
    return _from_meta(tensors, meta, target)


@dataclass(frozen=True)
class ActivationStats:
    """Streaming statistics of a capture: float64 moments per site, shaped ``[layer, pos, d]``."""

    moments: dict[str, Moments]
    layers: tuple[int, ...]
    positions: tuple[str, ...]
    provenance: Provenance
    n_forward: int = 0
    """Forward passes (batches) the capture ran."""

    def mean(self, site: str) -> Float[Tensor, "layer pos d"]:
        """Float64 mean activations at ``site``."""
        if site not in self.moments:
            raise NotFoundError(f"site {site!r} was not captured; captured: {sorted(self.moments)}")
        return self.moments[site].mean

    @property
    def sites(self) -> tuple[str, ...]:
        """Captured sites."""
        return tuple(self.moments)

    @property
    def n(self) -> int:
        """Number of prompts the statistics are over."""
        return next(iter(self.moments.values())).n

    def _meta(self) -> dict[str, Any]:
        first = next(iter(self.moments.values()))
        if any(m.n != first.n or m.ddof != first.ddof for m in self.moments.values()):
            raise SafegeomError("every site's moments must have the same n and ddof to be saved")
        return {
            "format": STATS_FORMAT,
            "sites": list(self.moments),
            "layers": list(self.layers),
            "positions": list(self.positions),
            "n": first.n,
            "ddof": first.ddof,
            "covariance": [s for s, m in self.moments.items() if m.cov is not None],
            "n_forward": self.n_forward,
            "provenance": self.provenance.to_dict(),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write one safetensors file (``{site}.mean``, ``{site}.cov``) and ``path.json`` (its
        sidecar: sites, layers, positions, n, provenance) atomically.

        Returns:
            ``path``.
        """
        target = Path(path)
        meta = self._meta()
        tensors: dict[str, Tensor] = {}
        for site, m in self.moments.items():
            tensors[f"{site}.mean"] = m.mean.detach().to("cpu", torch.float64)
            if m.cov is not None:
                tensors[f"{site}.cov"] = m.cov.detach().to("cpu", torch.float64)
        save_safetensors(target, tensors, meta)
        write_json(Path(f"{target}.json"), meta)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ActivationStats:
        """Read a file written by :meth:`save`.

        Raises:
            NotFoundError: nothing at ``path``.
            ArtifactError: not a safegeom statistics file, or a tensor is missing.
        """
        target = Path(path)
        tensors, meta = read_safetensors(target, what="activation statistics")
        if meta.get("format") != STATS_FORMAT:
            raise ArtifactError(
                f"{target} is not a safegeom statistics file (format {meta.get('format')!r})"
            )
        moments: dict[str, Moments] = {}
        for site in meta["sites"]:
            if f"{site}.mean" not in tensors:
                raise ArtifactError(f"{target} has no tensor {site}.mean")
            moments[site] = Moments(
                n=int(meta["n"]),
                mean=tensors[f"{site}.mean"],
                cov=tensors.get(f"{site}.cov"),
                ddof=int(meta["ddof"]),
            )
        return cls(
            moments=moments,
            layers=tuple(meta["layers"]),
            positions=tuple(meta["positions"]),
            provenance=_provenance(meta["provenance"]),
            n_forward=int(meta.get("n_forward", 0)),
        )
