"""Captured activations as a value: tensors by site, with layers, positions and provenance.

On disk an :class:`Activations` is one safetensors file (one tensor per site, shaped
``[n_prompts, n_layers, n_positions, d]``) plus a JSON sidecar (``<file>.json``) holding the
layers, position labels and :class:`~safegeom.provenance.Provenance`. The same JSON is also in the
safetensors metadata, so the tensor file alone is self-describing. A sharded capture is a folder
of ``shard-NNNNN.safetensors`` files plus ``activations.json``; :func:`load_activations` reads
either form.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from safegeom.provenance import Provenance

__all__ = ["Activations", "atomic_save_safetensors", "load_activations"]

FORMAT = "safegeom.activations/1"
SHARD_INDEX = "activations.json"


def atomic_save_safetensors(
    tensors: Mapping[str, Tensor], path: Path, meta: dict[str, str]
) -> None:
    """Write a safetensors file through a temporary file and a rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


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
            raise KeyError(f"site {site!r} was not captured; captured: {sorted(self.data)}")
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
        if layer < 0:
            return range(len(self.layers))[layer]
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not captured; captured: {list(self.layers)}")
        return self.layers.index(layer)

    def position_index(self, position: str) -> int:
        """Index of a position label (``t_inst``, ``t_post[-1]``, ``last``, ``offset[-3]``)."""
        if position not in self.positions:
            raise ValueError(
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
        atomic_save_safetensors(self.data, target, {"safegeom": json.dumps(meta)})
        _atomic_write_text(Path(f"{target}.json"), json.dumps(meta, indent=2, sort_keys=True))
        return target


def _from_meta(data: dict[str, Tensor], meta: dict[str, Any]) -> Activations:
    if meta.get("format") != FORMAT:
        raise ValueError(f"not a safegeom activations file (format {meta.get('format')!r})")
    return Activations(
        data=data,
        layers=tuple(meta["layers"]),
        positions=tuple(meta["positions"]),
        provenance=Provenance.from_dict(meta["provenance"]),
    )


def load_activations(path: str | os.PathLike[str]) -> Activations:
    """Read activations written by :meth:`Activations.save` or a sharded capture folder.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: the file is not a safegeom activations file.
    """
    target = Path(path)
    if target.is_dir():
        index = json.loads((target / SHARD_INDEX).read_text())
        parts = [load_file(target / name) for name in index["shards"]]
        order = torch.cat([p.pop("prompt_index") for p in parts])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        data = {site: torch.cat([p[site] for p in parts])[inverse] for site in index["sites"]}
        return _from_meta(data, index)
    if not target.is_file():
        raise FileNotFoundError(f"no activations at {target}")
    from safetensors import safe_open

    with safe_open(str(target), framework="pt") as handle:
        header = handle.metadata() or {}
    if "safegeom" not in header:
        raise ValueError(f"{target} is not a safegeom activations file (no safegeom metadata)")
    return _from_meta(load_file(target), json.loads(header["safegeom"]))
