"""``CaptureConfig``: what to capture and how, the same in Python and on the command line."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from safegeom.config import check
from safegeom.errors import ConfigError, SafegeomError
from safegeom.hooks import SITES
from safegeom.models.positions import LayerSpec, PositionSpec

__all__ = ["BACKENDS", "CaptureConfig", "parse_sites", "storage_dtype"]

Backend = Literal["hooks", "transformer_lens"]
BACKENDS: tuple[str, ...] = ("hooks", "transformer_lens")
"""The capture backends: safegeom's own hooks, or transformer-lens' ``TransformerBridge``."""


def parse_sites(sites: str | Sequence[str]) -> tuple[str, ...]:
    """Sites from a comma list or a sequence, unique and in order.

    Raises:
        ConfigError: an empty list or an unknown site.
    """
    items = [s.strip() for s in sites.split(",")] if isinstance(sites, str) else list(sites)
    bad = [s for s in items if s not in SITES]
    if bad or not items:
        raise ConfigError(f"unknown site(s) {bad or items}: use {', '.join(SITES)}")
    return tuple(dict.fromkeys(items))


def storage_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype of a storage dtype name (``None`` stays ``None``: the model's dtype).

    Raises:
        ConfigError: the name is not a torch dtype, or not a floating-point one.
    """
    if name is None:
        return None
    value = name if isinstance(name, torch.dtype) else getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        shown = str(name).removeprefix("torch.")
        raise ConfigError(
            f"dtype (--storage-dtype) must be a floating-point storage dtype (float32, "
            f"bfloat16, float16, float64), got {shown!r}"
        )
    return value


def _spec(parse: Any, value: Any) -> Any:
    try:
        return parse(value)
    except SafegeomError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None


@dataclass(frozen=True)
class CaptureConfig:
    """What to capture (sites, layers, positions), how (batch size, backend, dtype), and where to.

    Library functions take this config: ``capture(lm, prompts, CaptureConfig(layers="2-5"))``.
    Strings, ints, lists and ``torch.dtype`` values are accepted for the typed fields and
    normalised here. Whether to show a progress bar is not a setting of what is captured: it is
    the ``progress`` keyword of :func:`~safegeom.activations.capture` and its siblings.
    """

    sites: tuple[str, ...] = ("resid_pre",)
    """Sites to capture: resid_pre, resid_post, attn_out, mlp_out (comma list)."""
    layers: LayerSpec = LayerSpec("all")
    """Layers: all, 5, -1, 2:6 (end-exclusive), 2-5 (inclusive) or comma lists of these."""
    positions: PositionSpec = PositionSpec("t_post")
    """Token positions: t_inst, t_post, last or integer offsets (-1 is the last prompt token)."""
    batch_size: int | None = None
    """Prompts per forward pass (default: chosen from the memory available)."""
    system: str | None = None
    """System prompt put before every instruction."""
    backend: Backend = "hooks"
    """hooks (safegeom's own, fastest) or transformer_lens (transformer-lens' TransformerBridge)."""
    dtype: str | None = field(default=None, metadata={"flag": "--storage-dtype"})
    """Storage dtype of the activations: float32, bfloat16, float16 (default: the model's)."""
    shard_size: int | None = None
    """Stream to a folder of safetensors shards of about this many prompts each."""
    stats: bool = False
    """Keep only float64 running means per site (and covariances with --covariance)."""
    covariance: bool = False
    """With --stats: also accumulate float64 covariances over the hidden dimension."""

    def __post_init__(self) -> None:
        sites = parse_sites(self.sites)
        layers = _spec(LayerSpec.parse, self.layers)
        positions = _spec(PositionSpec.parse, self.positions)
        dtype = storage_dtype(self.dtype)
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "dtype", None if dtype is None else str(dtype)[len("torch.") :])
        if self.backend not in BACKENDS:
            hint = " (renamed transformer_lens)" if self.backend == "lens" else ""
            raise ConfigError(
                f"unknown capture backend {self.backend!r}{hint}: use {' or '.join(BACKENDS)}"
            )
        if self.batch_size is not None:
            check(self.batch_size >= 1, "batch_size", "must be at least 1", self.batch_size)
        if self.shard_size is not None:
            check(
                self.shard_size >= 1,
                "shard_size",
                "must be a positive number of prompts",
                self.shard_size,
            )
            check(not self.stats, "shard_size", "cannot be combined with --stats (pick one mode)")
        check(self.stats or not self.covariance, "covariance", "needs --stats")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The storage dtype as a ``torch.dtype`` (``None``: the model's dtype)."""
        return storage_dtype(self.dtype)
