"""Hooks, only ever through a context manager that removes them.

Every forward hook safegeom registers goes through :func:`attach`, which removes all of them in a
``finally`` block, whether the body returns, raises, or the forward pass itself raises.

With a device map (``load_model(..., LoadConfig(device_map=...))``) the blocks live on several devices and a
hook sees its hidden state on whichever device computed it. A hook's own tensors (a direction, a
basis) are held in a :class:`PerDevice`, which copies them once to each device (and dtype) asked
for.

Sites follow TransformerLens' names:

- ``resid_pre``: the input of decoder block ``layer`` (a forward pre-hook on the block);
- ``resid_post``: the output of decoder block ``layer``;
- ``attn_out`` / ``mlp_out``: what the block's attention / MLP writes into the residual stream (the
  output of the layout's ``attn`` / ``mlp`` module).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from safegeom.errors import ConfigError
from safegeom.models.layout import resolve
from safegeom.models.loading import LoadedModel

__all__ = [
    "SITES",
    "Hook",
    "PerDevice",
    "Site",
    "attach",
    "hidden_of",
    "replace_hidden",
    "site_hook_point",
]

Site = Literal["resid_pre", "resid_post", "attn_out", "mlp_out"]
SITES: tuple[Site, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out")

HookFn = Callable[[Tensor], Tensor | None]
"""Receives the hidden-state tensor ``[batch, seq, d]``; returns a replacement or ``None``."""


@dataclass(frozen=True)
class Hook:
    """A function to run on the hidden state at one module: before it (``pre``) or after it."""

    module: nn.Module
    when: Literal["pre", "post"]
    fn: HookFn


class PerDevice:
    """A tensor a hook applies, and its copies on each device (and dtype) it is asked for.

    ``like(hidden)`` is the tensor on ``hidden``'s device in ``hidden``'s dtype; each (device,
    dtype) is copied once and then reused, so a model spread over devices pays one copy per
    device, not one per forward pass.
    """

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor
        self._copies: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def on(self, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
        """The tensor on ``device`` in ``dtype`` (default: its own dtype)."""
        key = (device, dtype or self.tensor.dtype)
        copy = self._copies.get(key)
        if copy is None:
            copy = self._copies[key] = self.tensor.to(device, key[1])
        return copy

    def like(self, hidden: Tensor) -> Tensor:
        """The tensor on ``hidden``'s device, in ``hidden``'s dtype."""
        return self.on(hidden.device, hidden.dtype)


def site_hook_point(
    lm: LoadedModel, site: str, layer: int
) -> tuple[nn.Module, Literal["pre", "post"]]:
    """Return the module and hook kind that expose ``site`` at ``layer``.

    Raises:
        ConfigError: an unknown site.
    """
    block = lm.blocks[layer]
    if site == "resid_pre":
        return block, "pre"
    if site == "resid_post":
        return block, "post"
    if site == "attn_out":
        return resolve(block, lm.layout.attn), "post"
    if site == "mlp_out":
        return resolve(block, lm.layout.mlp), "post"
    raise ConfigError(f"unknown site {site!r}: use one of {', '.join(SITES)}")


def hidden_of(value: Any) -> Tensor:
    """The hidden-state tensor inside a module's input args or output (first tensor)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    raise TypeError(f"cannot find a hidden-state tensor in {type(value).__name__}")


def replace_hidden(value: Any, hidden: Tensor) -> Any:
    """``value`` with its hidden-state tensor replaced by ``hidden`` (same container type)."""
    if isinstance(value, Tensor):
        return hidden
    return type(value)((hidden, *value[1:]))


def _pre_wrapper(fn: HookFn) -> Callable[..., Any]:
    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return pre_hook


def _post_wrapper(fn: HookFn) -> Callable[..., Any]:
    def post_hook(module: nn.Module, args: tuple, output: Any) -> Any:
        new = fn(hidden_of(output))
        return None if new is None else replace_hidden(output, new)

    return post_hook


@contextmanager
def attach(hooks: Sequence[Hook]) -> Iterator[None]:
    """Register ``hooks`` for the duration of the block; always remove them afterwards."""
    handles = []
    try:
        for hook in hooks:
            if hook.when == "pre":
                handles.append(
                    hook.module.register_forward_pre_hook(_pre_wrapper(hook.fn), with_kwargs=True)
                )
            else:
                handles.append(hook.module.register_forward_hook(_post_wrapper(hook.fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()
