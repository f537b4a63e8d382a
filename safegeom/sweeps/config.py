"""The grid and controls of a causal sweep: :class:`SweepConfig` (also the ``sweep`` options)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from safegeom.config import check
from safegeom.errors import ConfigError, NonFiniteError

__all__ = ["OPS", "AblateLayers", "SweepConfig"]

OPS = ("ablate", "add")
"""The interventions a sweep knows."""


class AblateLayers(tuple):
    """Layer specs at which to ablate, one cell each; parsed from ``;``-separated text
    (``all;0:2;3-5``), since one layer spec may itself hold commas (``1,3``)."""

    @classmethod
    def parse(cls, text: str) -> AblateLayers:
        """``"all;2:6"`` → ``AblateLayers(("all", "2:6"))``.

        Raises:
            ConfigError: no layer spec in ``text``.
        """
        parts = tuple(p.strip() for p in str(text).split(";") if p.strip())
        if not parts:
            raise ConfigError(f"--ablate-layers needs at least one layer spec, got {text!r}")
        return cls(parts)

    @property
    def spec(self) -> str:
        """The ``;``-separated text form."""
        return ";".join(self)


ALL_LAYERS = AblateLayers(("all",))
"""The default ablation cell: every layer."""


def _floats(values: Any, name: str, flag: str) -> tuple[float, ...]:
    if isinstance(values, str):
        raise ConfigError(f"{name} ({flag}) must be a list of numbers, got {values!r}")
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} ({flag}) must be numbers, got {values!r}") from None
    if not out:
        raise ConfigError(f"{name} ({flag}) needs at least one value, got none")
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise NonFiniteError(f"{name} ({flag}) must be finite numbers, got {bad[0]}")
    return out


@dataclass(frozen=True)
class SweepConfig:
    """Grid and controls of a causal sweep (each field is also a ``safegeom sweep`` option)."""

    ops: tuple[str, ...] = OPS
    """Interventions to sweep: ablate and/or add."""
    add_layers: str = "all"
    """Layers for addition, one cell each (a layer spec: all, 2:6 end-exclusive, 2-5 inclusive, 1,3)."""
    add_strengths: tuple[float, ...] = field(
        default=(-2.0, -1.0, -0.5, 0.5, 1.0, 2.0), metadata={"flag": "--strengths"}
    )
    """Addition coefficients, in multiples of the carrier vector."""
    ablate_layers: AblateLayers = ALL_LAYERS
    """';'-separated layer specs at which to ablate, one cell each (2:6 end-exclusive, 2-5 inclusive)."""
    ablate_strengths: tuple[float, ...] = (1.0,)
    """Fractions of the component removed by ablation (1 removes it), one cell each."""
    n_random: int = 20
    """Matched random unit directions per cell (20 or more recommended)."""
    n_prompts: int = 32
    """Prompts per population (the first N of each set)."""
    seed: int = 0
    """Seed of the random controls and of the bootstrap."""
    batch_size: int = 128
    """Prompts per forward pass."""
    generate: bool = False
    """Also generate completions and judge refusals (slower)."""
    max_new_tokens: int = 24
    """Tokens per completion when generating."""
    n_resamples: int = 1000
    """Bootstrap resamples of the effect-minus-control interval."""

    def __post_init__(self) -> None:
        """Normalise lists to tuples and check every value.

        Raises:
            ConfigError: a value out of range.
            NonFiniteError: a NaN or infinite strength.
        """
        ops = (self.ops,) if isinstance(self.ops, str) else tuple(self.ops)
        object.__setattr__(self, "ops", ops)
        bad = [op for op in ops if op not in OPS]
        if bad:
            raise ConfigError(f"unknown sweep op(s) {bad}: use ablate and/or add (--ops)")
        if not ops:
            raise ConfigError("ops (--ops) needs ablate and/or add, got none")
        layers = self.ablate_layers
        if isinstance(layers, str):
            layers = AblateLayers.parse(layers)
        elif not isinstance(layers, AblateLayers):
            layers = AblateLayers(str(x) for x in layers)
        object.__setattr__(self, "ablate_layers", layers)
        strengths = _floats(self.add_strengths, "add_strengths", "--strengths")
        object.__setattr__(self, "add_strengths", strengths)
        fractions = _floats(self.ablate_strengths, "ablate_strengths", "--ablate-strengths")
        object.__setattr__(self, "ablate_strengths", fractions)
        if self.n_random < 1:
            raise ConfigError(
                f"n_random must be at least 1 (--n-random; 20 or more recommended), "
                f"got {self.n_random}"
            )
        check(self.n_prompts >= 1, "n_prompts", "must be at least 1", self.n_prompts)
        check(self.batch_size >= 1, "batch_size", "must be at least 1", self.batch_size)
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1", self.max_new_tokens)
        check(self.n_resamples >= 1, "n_resamples", "must be at least 1", self.n_resamples)
