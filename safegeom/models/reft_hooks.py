"""The hooks that apply a RefusalGuard edit to a model's forward passes (see ``models.reft``).

The hooks are registered directly on the modules, by a handle that removes all of them (on
``remove()``, on leaving ``with``, or when registration fails half-way). ``safegeom.hooks`` cannot
carry this edit: its functions see only the hidden state, and the edit needs each call's attention
mask (captured by a pre-hook on the decoder that owns the blocks); and ``load_model`` attaches it,
while ``safegeom.hooks`` imports the loader.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from safegeom.models.layout import resolve

if TYPE_CHECKING:
    from safegeom.models.loading import LoadedModel
    from safegeom.models.reft import ReftEdit

__all__ = ["ReftHandle"]


class ReftHandle:
    """The hooks of one attached edit; ``remove()`` is idempotent; also a context manager."""

    def __init__(self, edit: ReftEdit, lm: LoadedModel) -> None:
        self.edit, self.blocks = edit, lm.blocks
        self._handles: list[Any] = []
        self._state: dict[str, Any] = {}
        parent_path = lm.layout.blocks.rpartition(".")[0]
        decoder = resolve(lm.base, parent_path) if parent_path else lm.base
        self._signature = inspect.signature(decoder.forward)
        try:
            self._handles.append(decoder.register_forward_pre_hook(self._capture, with_kwargs=True))
            for layer in edit.config.layers:
                block = self.blocks[layer]
                if edit.config.site == "resid_pre":
                    hook = block.register_forward_pre_hook(self._pre(layer), with_kwargs=True)
                else:
                    hook = block.register_forward_hook(self._post(layer))
                self._handles.append(hook)
        except BaseException:
            self.remove()
            raise

    @property
    def attached(self) -> bool:
        """Whether the hooks are still registered."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove every hook of this attachment (safe to call twice)."""
        while self._handles:
            self._handles.pop().remove()
        if self in self.edit._handles:
            self.edit._handles.remove(self)

    def __enter__(self) -> ReftHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        try:
            bound = self._signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            self._state = {}
            return
        extra = bound.get("kwargs", {})
        get = lambda name: bound.get(name, extra.get(name))  # noqa: E731
        tokens = get("input_ids")
        tokens = get("inputs_embeds") if tokens is None else tokens
        if tokens is None:
            self._state = {}
            return
        batch, seq = tokens.shape[0], tokens.shape[1]
        mask, past = get("attention_mask"), get("past_key_values")
        if isinstance(mask, Tensor) and mask.dim() == 2:
            past_len = mask.shape[1] - seq
            mask = mask[:, past_len:].bool()
        else:
            has_len = past is not None and hasattr(past, "get_seq_length")
            past_len = int(past.get_seq_length()) if has_len else 0
            mask = torch.ones(batch, seq, dtype=torch.bool, device=tokens.device)
        self._state = {"positions": self.edit.edited_positions(mask, past_len > 0)}

    def _positions(self, hidden: Tensor) -> Tensor:
        positions = self._state.get("positions")
        if positions is None or positions.shape != hidden.shape[:2]:
            ones = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            positions = self.edit.edited_positions(ones, False)
        return positions.to(hidden.device)

    def _apply(self, layer: int, hidden: Tensor) -> Tensor | None:
        positions = self._positions(hidden)
        if not bool(positions.any()):
            return None
        module = self.edit.layer(layer)
        delta = module(hidden.to(module.weight.dtype))
        return torch.where(positions[..., None], hidden + delta.to(hidden.dtype), hidden)

    def _pre(self, layer: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if args:
                new = self._apply(layer, args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = self._apply(layer, kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        return hook

    def _post(self, layer: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            hidden = output if isinstance(output, Tensor) else output[0]
            new = self._apply(layer, hidden)
            if new is None:
                return None
            return new if isinstance(output, Tensor) else type(output)((new, *output[1:]))

        return hook
