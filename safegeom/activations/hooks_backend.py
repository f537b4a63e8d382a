"""The ``hooks`` capture backend: safegeom's own forward hooks, at close to a plain pass's cost.

- Hooks copy *only the requested positions* of each hooked hidden state, inside the hook, into a
  preallocated device buffer ``[batch, n_layers, n_positions, d]``; no hook keeps a reference to a
  full-sequence tensor.
- The forward pass stops (by an exception caught here) right after the last requested layer, so
  later blocks, the final norm and the LM head are never computed.
- A model spread over devices by a device map (``lm.split``) keeps one buffer per (site, layer)
  on the device of the activation it holds; each hook copies its rows out at once into a CPU
  buffer, asynchronously (``non_blocking``, into pinned memory) when the source is on CUDA, and
  :meth:`HookRecorder.record` synchronises those devices before the caller reads the CPU buffer.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
from torch import Tensor

from safegeom.activations.plan import CapturePlan
from safegeom.hooks import Hook, attach, site_hook_point
from safegeom.models.chat import ChatBatch
from safegeom.models.loading import LoadedModel

__all__ = ["HookRecorder"]


class _StopForward(Exception):
    """Raised by the last hook to end the forward pass early."""


class HookRecorder:
    """Copies the plan's positions into device buffers from inside forward hooks.

    ``buffers[site]`` is ``[batch_size, n_layers, n_positions, d]``; :meth:`record` fills its
    first rows for one batch. It lives on the model's device, or, for a model spread over
    devices, on the CPU (pinned when CUDA is available), filled from per-layer device buffers.
    """

    label = "capture"
    """Progress-bar label."""

    def __init__(self, lm: LoadedModel, plan: CapturePlan) -> None:
        self.lm, self.plan = lm, plan
        shape = (plan.batch_size, len(plan.layers), plan.positions.n_positions, lm.d_model)
        self.split = lm.split
        if self.split:  # layer-major pinned CPU memory, so that each layer's rows are contiguous
            pinned = torch.cuda.is_available()
            stored = (shape[1], shape[0], *shape[2:])
            self.buffers = {
                s: torch.empty(stored, dtype=plan.dtype, pin_memory=pinned).transpose(0, 1)
                for s in plan.sites
            }
        else:
            self.buffers = {
                s: torch.empty(shape, dtype=plan.dtype, device=lm.device) for s in plan.sites
            }
        self.parts: dict[tuple[str, int], Tensor] = {}
        """Split models: the device buffer ``[batch_size, n_positions, d]`` of each (site, j)."""
        self.rows: Tensor | None = None
        self.index: Tensor | None = None
        self._placed: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._devices: set[torch.device] = set()
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
        if not self.split:
            picked = hidden[self.rows, self.index]  # [B, P, d]: only the requested positions
            self.buffers[site][: picked.shape[0], j].copy_(picked)
            return
        rows, index = self._on(hidden.device)
        picked = hidden[rows, index]
        part = self.parts.get((site, j))
        if part is None or part.device != hidden.device:
            shape = (self.plan.batch_size, *picked.shape[1:])
            part = self.parts[site, j] = torch.empty(
                shape, dtype=self.plan.dtype, device=hidden.device
            )
        n = picked.shape[0]
        part[:n].copy_(picked)
        cuda = part.device.type == "cuda"
        self.buffers[site][:n, j].copy_(part[:n], non_blocking=cuda)  # ordered on this stream
        if cuda:
            self._devices.add(part.device)

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """This batch's row and position indices on ``device`` (copied once per device)."""
        placed = self._placed.get(device)
        if placed is None:
            assert self.rows is not None and self.index is not None
            placed = self._placed[device] = (self.rows.to(device), self.index.to(device))
        return placed

    @staticmethod
    def _stop(hidden: Tensor) -> None:
        raise _StopForward

    def record(self, batch: ChatBatch, index: Tensor, rows: Tensor) -> None:
        """Run one forward pass over ``batch`` (on the model's device), filling the buffers.

        ``index[b, p]`` is the padded position of position ``p`` in row ``b``; ``rows`` is
        ``arange(batch)[:, None]``.
        """
        self.index, self.rows = index, rows
        self._placed.clear()
        # Hooks live only for this forward pass, so nothing is attached while the caller runs.
        with torch.inference_mode(), attach(self._hooks), contextlib.suppress(_StopForward):
            self.lm.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            )
        for device in self._devices:  # the asynchronous copies out have landed
            torch.cuda.synchronize(device)
