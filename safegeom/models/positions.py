"""Token-position and layer specifications.

Positions: ``t_inst`` (last instruction token), ``t_post`` (every template token after the
instruction, through the last prompt token), ``last``, and explicit integer offsets: a negative
offset counts from the end of the prompt (``-1`` is the last token), a non-negative one from its
first real token. A spec is a comma-separated string (``"t_inst,t_post"``, ``"-1,-3"``) or a
sequence of those items.

``t_post`` must give every prompt of a set the same number of positions. Chat templates put a
fixed run of template tokens after the instruction, so this holds in practice; where a tokenizer
merges the instruction's last characters with the template differently across prompts, ``t_post``
uses the shortest run (the tokens nearest the end) and says so with a warning.

Layers: ``"all"``, one index, ``"a:b"`` (Python slice, end exclusive), ``"a-b"`` (inclusive),
comma lists, and negative indices counted from the end.

:class:`LayerSpec` and :class:`PositionSpec` are the typed values of these strings: they parse
(and check the syntax) the same way in Python and on the command line, and resolve against a model.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from safegeom.errors import ConfigError
from safegeom.models.chat import ChatBatch, EncodedPrompt

__all__ = [
    "LAYER_HELP",
    "POSITION_HELP",
    "LayerSpec",
    "PositionPlan",
    "PositionSpec",
    "parse_layers",
    "parse_positions",
    "plan_positions",
]

_NAMED = ("t_inst", "t_post", "last")

LAYER_HELP = "all, 5, -1, 2:6 (end-exclusive), 2-5 (inclusive) or comma lists of these"
"""How a layer spec is written; every help text that takes one says this."""
POSITION_HELP = (
    "t_inst, t_post, last or integer offsets (-1 is the last prompt token), comma-separated"
)
"""How a position spec is written."""


@dataclass(frozen=True)
class LayerSpec:
    """Which layers: ``all``, ``5``, ``-1``, ``2:6`` (end-exclusive), ``2-5`` (inclusive), lists.

    Example:
        >>> LayerSpec.parse("2-3,-1").resolve(6)
        (2, 3, 5)
    """

    spec: str = "all"
    """The spec as written."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "spec", str(self.spec).strip())
        if self.spec != "all":
            _layer_terms(self.spec)

    @classmethod
    def parse(cls, spec: str | int | Sequence[int] | LayerSpec | None) -> LayerSpec:
        """A spec from a string, an index, a list of indices or ``None`` (all layers)."""
        if isinstance(spec, LayerSpec):
            return spec
        if spec is None:
            return cls("all")
        if isinstance(spec, int):
            return cls(str(spec))
        if not isinstance(spec, str):
            return cls(",".join(str(int(i)) for i in spec))
        return cls(spec)

    def resolve(self, n_layers: int) -> tuple[int, ...]:
        """Sorted unique non-negative layers of a model with ``n_layers`` blocks.

        Raises:
            ValueError: a layer is out of range (the message gives the valid range).
        """
        return parse_layers(self.spec, n_layers)

    def __str__(self) -> str:
        return self.spec


@dataclass(frozen=True)
class PositionSpec:
    """Which token positions: ``t_inst``, ``t_post``, ``last`` and integer offsets.

    Example:
        >>> PositionSpec.parse("t_inst,-1").items
        ('t_inst', -1)
    """

    spec: str = "t_post"
    """The spec as written."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "spec", str(self.spec).strip())
        parse_positions(self.spec)

    @classmethod
    def parse(cls, spec: str | int | Sequence[str | int] | PositionSpec) -> PositionSpec:
        """A spec from a string, an offset or a list of names and offsets."""
        if isinstance(spec, PositionSpec):
            return spec
        if isinstance(spec, int):
            return cls(str(spec))
        if not isinstance(spec, str):
            return cls(",".join(str(i) for i in spec))
        return cls(spec)

    @property
    def items(self) -> tuple[str | int, ...]:
        """The parsed names and offsets."""
        return parse_positions(self.spec)

    def __str__(self) -> str:
        return self.spec


def parse_positions(
    spec: str | int | Sequence[str | int] | PositionSpec,
) -> tuple[str | int, ...]:
    """Parse a position spec into a tuple of names and integer offsets.

    Raises:
        ValueError: an empty spec or an unknown position name.
    """
    items: Sequence[str | int]
    if isinstance(spec, PositionSpec):
        spec = spec.spec
    if isinstance(spec, int):
        items = [spec]
    elif isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        items = list(spec)
    out: list[str | int] = []
    for item in items:
        if isinstance(item, int):
            out.append(item)
            continue
        text = str(item).strip()
        if text in _NAMED:
            out.append(text)
            continue
        try:
            out.append(int(text))
        except ValueError:
            raise ConfigError(
                f"unknown position {text!r}: use t_inst, t_post, last or an integer offset"
            ) from None
    if not out:
        raise ConfigError("empty position spec: use t_inst, t_post, last or integer offsets")
    return tuple(out)


def _layer_terms(spec: str | int | Sequence[int]) -> list[int | tuple[str, int | None, int | None]]:
    """Parse a layer spec without a model: ints, ``("slice", a, b)`` and ``("range", a, b)``.

    Raises:
        ConfigError: a malformed spec.
    """
    parts: Sequence[str | int]
    parts = [spec] if isinstance(spec, int) else spec.split(",") if isinstance(spec, str) else spec
    terms: list[int | tuple[str, int | None, int | None]] = []
    for part in parts:
        if isinstance(part, int):
            terms.append(part)
            continue
        text = part.strip()
        try:
            if ":" in text:
                a, b = text.split(":", 1)
                terms.append(("slice", int(a) if a else None, int(b) if b else None))
            elif "-" in text[1:]:
                a, b = text[0] + text[1:].split("-", 1)[0], text[1:].split("-", 1)[1]
                terms.append(("range", int(a), int(b)))
            else:
                terms.append(int(text))
        except ValueError:
            raise ConfigError(f"bad layer spec {spec!r}: use {LAYER_HELP}") from None
    return terms


def parse_layers(
    spec: str | int | Sequence[int] | LayerSpec | None, n_layers: int
) -> tuple[int, ...]:
    """Resolve a layer spec to sorted, unique, non-negative layer indices.

    Raises:
        ConfigError: a malformed spec, an empty selection, or a layer out of range (the message
            gives the valid range).
    """
    if isinstance(spec, LayerSpec):
        spec = spec.spec
    if spec is None or (isinstance(spec, str) and spec.strip() == "all"):
        return tuple(range(n_layers))
    raw: list[int] = []
    for term in _layer_terms(spec):
        if isinstance(term, int):
            raw.append(term)
        elif term[0] == "slice":
            raw.extend(range(n_layers)[slice(term[1], term[2])])
        else:
            lo, hi = _norm_layer(int(term[1]), n_layers), _norm_layer(int(term[2]), n_layers)
            raw.extend(range(lo, hi + 1))
    layers = sorted({_norm_layer(layer, n_layers) for layer in raw})
    if not layers:
        raise ConfigError(f"layer spec {spec!r} selects no layer of {n_layers}")
    return tuple(layers)


def _norm_layer(layer: int, n_layers: int) -> int:
    if not -n_layers <= layer < n_layers:
        raise ConfigError(
            f"layer {layer} out of range: the model has {n_layers} layers (0..{n_layers - 1}, "
            f"or -{n_layers}..-1)"
        )
    return layer % n_layers


@dataclass(frozen=True)
class PositionPlan:
    """Positions resolved for one prompt set: labels, and how to index each padded batch."""

    items: tuple[str | int, ...]
    n_post: int
    labels: tuple[str, ...]

    @property
    def n_positions(self) -> int:
        """Number of positions captured per prompt."""
        return len(self.labels)

    def index(self, batch: ChatBatch) -> Int[Tensor, "batch pos"]:
        """Padded sequence indices of every position, for each prompt of ``batch``.

        Raises:
            ValueError: an explicit offset falls outside a prompt.
        """
        seq = batch.seq_len
        start = seq - batch.lengths  # first real token of each row
        cols: list[Tensor] = []
        for item in self.items:
            if item == "t_inst":
                cols.append(batch.t_inst)
            elif item == "last":
                cols.append(torch.full_like(batch.lengths, seq - 1))
            elif item == "t_post":
                cols.extend(torch.full_like(batch.lengths, seq + k) for k in range(-self.n_post, 0))
            else:
                offset = int(item)
                col = torch.full_like(batch.lengths, seq + offset) if offset < 0 else start + offset
                if bool((col < start).any() or (col >= seq).any()):
                    raise ConfigError(
                        f"position offset {offset} lies outside a prompt of "
                        f"{int(batch.lengths.min())} tokens"
                    )
                cols.append(col)
        return torch.stack(cols, dim=1)


def plan_positions(
    spec: str | int | Sequence[str | int], encoded: Sequence[EncodedPrompt]
) -> PositionPlan:
    """Fix the positions for a whole prompt set (so every batch has the same count)."""
    items = parse_positions(spec)
    counts = {e.n_post for e in encoded}
    n_post = min(counts) if counts else 0
    if "t_post" in items:
        if n_post < 1:
            raise ConfigError("t_post is empty: the template puts no token after the instruction")
        if len(counts) > 1:
            warnings.warn(
                f"post-instruction token counts differ across prompts ({sorted(counts)}); "
                f"t_post uses the last {n_post}",
                stacklevel=2,
            )
    labels: list[str] = []
    for item in items:
        if item == "t_post":
            labels.extend(f"t_post[{k}]" for k in range(-n_post, 0))
        elif isinstance(item, int):
            labels.append(f"offset[{item}]")
        else:
            labels.append(str(item))
    return PositionPlan(items=items, n_post=n_post, labels=tuple(labels))
