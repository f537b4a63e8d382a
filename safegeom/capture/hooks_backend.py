"""The ``hooks`` capture backend: safegeom's own forward hooks, at close to a plain pass's cost.

- Hooks copy *only the requested positions* of each hooked hidden state, inside the hook, into a
  preallocated device buffer ``[batch, n_layers, n_positions, d]``; no hook keeps a reference to a
  full-sequence tensor.
- The forward pass stops (by an exception caught here) right after the last requested layer, so
  later blocks, the final norm and the LM head are never computed.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
from torch import Tensor

from safegeom.capture.plan import CapturePlan
from safegeom.hooks import Hook, attach, site_hook_point
from safegeom.models.chat import ChatBatch
from safegeom.models.loading import LoadedModel

__all__ = ["HookRecorder"]


class _StopForward(Exception):
    """Raised by the last hook to end the forward pass early."""


class HookRecorder:
    """Copies the plan's positions into device buffers from inside forward hooks.

    ``buffers[site]`` is ``[batch_size, n_layers, n_positions, d]``; :meth:`record` fills its
    first rows for one batch.
    """

    label = "capture"
    """Progress-bar label."""

    def __init__(self, lm: LoadedModel, plan: CapturePlan) -> None:
        self.lm, self.plan = lm, plan
        shape = (plan.batch_size, len(plan.layers), plan.positions.n_positions, lm.d_model)
        self.buffers = {
            s: torch.empty(shape, dtype=plan.dtype, device=lm.device) for s in plan.sites
        }
        self.rows: Tensor | None = None
        self.index: Tensor | None = None
        self._hooks = self._make_hooks()

    def _make_hooks(self) -> list[Hook]:
        hooks = []
        for site in self.plan.sites:
            for j, layer in enumerate(self.plan.layers):
                module, when = site_hook_point(self.lm, site, layer)
                hooks.append(Hook(module, when, partial(self._record, site, j)))
        last = self.plan.layers[-1]
        only_pre = all(s == "resid_pre" for s in self.plan.sites)
        hooks.append(Hook(self.lm.blocks[last], "pre" if only_pre else "post", self._stop))
        return hooks

    def _record(self, site: str, j: int, hidden: Tensor) -> None:
        assert self.rows is not None and self.index is not None
        picked = hidden[self.rows, self.index]  # [B, P, d]: only the requested positions
        self.buffers[site][: picked.shape[0], j].copy_(picked)

    @staticmethod
    def _stop(hidden: Tensor) -> None:
        raise _StopForward

    def record(self, batch: ChatBatch, index: Tensor, rows: Tensor) -> None:
        """Run one forward pass over ``batch`` (on the model's device), filling the buffers.

        ``index[b, p]`` is the padded position of position ``p`` in row ``b``; ``rows`` is
        ``arange(batch)[:, None]``.
        """
        self.index, self.rows = index, rows
        # Hooks live only for this forward pass, so nothing is attached while the caller runs.
        with torch.inference_mode(), attach(self._hooks), contextlib.suppress(_StopForward):
            self.lm.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            )
