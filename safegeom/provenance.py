"""Provenance: where a result came from, carried by every saved artifact."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

import safegeom

__all__ = ["Provenance", "text_hash"]


def text_hash(text: str | None) -> str:
    """Hex sha256 of a string ('' for None)."""
    return "" if text is None else hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Provenance:
    """What produced a set of activations (and, through them, carriers and tables)."""

    model: str
    """What the caller named: ``tiny-chat``, a path or a hub id."""
    weight_hash: str
    """sha256 of the weights (``fp:`` prefix: a fingerprint, for models over 10⁸ parameters)."""
    prompt_set: str
    """Name of the prompt set (bundled spec or file path)."""
    prompt_hash: str
    """Content hash of the prompt set."""
    n_prompts: int
    sites: tuple[str, ...]
    layers: tuple[int, ...]
    positions: tuple[str, ...]
    dtype: str
    """Storage dtype of the activations."""
    template_hash: str = ""
    """sha256 of the chat template used."""
    system: str | None = None
    """System prompt, if one was used."""
    backend: str = "hooks"
    version: str = safegeom.__version__

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Provenance:
        """Rebuild from :meth:`to_dict` output (unknown keys are ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("sites", "layers", "positions"):
            values[key] = tuple(values.get(key, ()))
        return cls(**values)

    def to_json(self) -> str:
        """Compact JSON."""
        return json.dumps(self.to_dict(), sort_keys=True)
