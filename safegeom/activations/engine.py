"""The batch loop of capture (:func:`iter_capture`), and the writer of activation shards.

Design (see docs/design.md, "Speed"):

- Prompts are sorted by length (stable) to cut padding; :func:`plan_batches` is the batch plan.
- Each backend (``hooks``, ``transformer_lens``) fills preallocated device buffers
  ``[batch, n_layers, n_positions, d]`` for one batch (CPU buffers, filled asynchronously from
  each layer's device, for a model a device map spreads over devices); the loop here collates,
  indexes the positions, checks for NaN/inf (one flag where the buffers are, read once at the
  end) and yields.
- :class:`ShardWriter` turns batches into safetensors shards and their index file.

The consumers (:mod:`safegeom.activations.loop` in one process, :mod:`safegeom.parallel.capture` over
several) share this loop; each runs either all batches or its share of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from safegeom.activations.config import CaptureConfig
from safegeom.activations.hooks_backend import HookRecorder
from safegeom.activations.plan import CapturePlan
from safegeom.activations.transformer_lens import BridgeRecorder
from safegeom.activations.values import FORMAT, SHARD_INDEX
from safegeom.artifacts import save_safetensors, write_json
from safegeom.batching import longest_first
from safegeom.errors import ConfigError, NonFiniteError
from safegeom.models.chat import ChatBatch, collate_left
from safegeom.models.loading import LoadedModel

__all__ = ["RECORDERS", "ShardWriter", "disk_config", "iter_capture", "plan_batches"]


class Recorder(Protocol):
    """What a backend provides: device buffers, and one forward pass that fills them."""

    label: str
    buffers: dict[str, Tensor]

    def record(self, batch: ChatBatch, index: Tensor, rows: Tensor) -> None:
        """Fill the first ``len(batch)`` rows of every buffer for one batch."""


RECORDERS: dict[str, Callable[[LoadedModel, CapturePlan], Recorder]] = {
    "hooks": HookRecorder,
    "transformer_lens": BridgeRecorder,
}
"""Backend name → recorder factory; the loop picks ``plan.backend`` here."""


def iter_capture(
    lm: LoadedModel,
    plan: CapturePlan,
    *,
    progress: bool = True,
    batches: Sequence[Sequence[int]] | None = None,
) -> Iterator[tuple[Tensor, dict[str, Float[Tensor, "batch layer pos d"]]]]:
    """Run the forward passes and yield ``(prompt_indices, {site: activations})`` per batch.

    The yielded tensors are *views of reused device buffers*: copy what you keep before asking
    for the next batch. Batches come in length order, not input order; ``prompt_indices`` says
    which prompts each row holds. ``progress`` shows a progress bar;
    ``batches`` (prompt indices, at most ``plan.batch_size`` each; default: every prompt,
    longest first) are the batches to run, e.g. one rank's share (:func:`plan_batches`).

    Raises:
        ConfigError: an unknown backend.
        NonFiniteError: NaN or inf in the captured activations (checked once, at the end).
    """
    if plan.backend not in RECORDERS:
        raise ConfigError(f"unknown capture backend {plan.backend!r}: use {' or '.join(RECORDERS)}")
    recorder = RECORDERS[plan.backend](lm, plan)
    todo = plan_batches(plan) if batches is None else [list(b) for b in batches]
    n = sum(len(b) for b in todo)
    pad = lm.tokenizer.pad_token_id
    device = lm.device  # where inputs go; the buffers may be elsewhere (a split model: CPU)
    held = next(iter(recorder.buffers.values())).device
    finite = torch.ones((), dtype=torch.bool, device=held)
    bar = tqdm(total=n, desc=recorder.label, unit="prompt", disable=not progress)
    for ids in todo:
        batch = collate_left([plan.encoded[i] for i in ids], pad)
        index = plan.positions.index(batch).to(device, non_blocking=True)
        rows = torch.arange(len(ids), device=device)[:, None]
        recorder.record(batch.to(device), index, rows)
        out = {s: buf[: len(ids)] for s, buf in recorder.buffers.items()}
        for tensor in out.values():
            finite &= torch.isfinite(tensor).all()
        yield torch.tensor(ids), out
        bar.update(len(ids))
    bar.close()
    if not bool(finite):
        raise NonFiniteError(
            f"NaN or inf in captured activations of {lm.name}; {overflow_advice(lm)}"
        )


def overflow_advice(lm: LoadedModel) -> str:
    """What to try when a model with finite weights (checked at load) gives non-finite values:
    float32 when it runs in lower precision, else the inputs or the model's own arithmetic."""
    if lm.dtype != torch.float32:
        return f"it runs in {str(lm.dtype).removeprefix('torch.')}: try --dtype float32"
    return (
        "its weights are finite and it runs in float32, so its activations overflow: check the "
        "model's config (norm eps, scaling) and the prompts"
    )


def plan_batches(plan: CapturePlan) -> list[list[int]]:
    """The batches of a plan: prompt indices in groups of ``plan.batch_size``, longest first.

    Returns:
        One list of input indices per forward pass, in the order one process runs them.
    """
    return list(longest_first([len(e) for e in plan.encoded], plan.batch_size))


def disk_config(config: CaptureConfig) -> tuple[CaptureConfig, int]:
    """The config of a capture to disk (``shard_size`` 4096 unless set), and its shard size."""
    if config.shard_size is None:
        config = dataclasses.replace(config, shard_size=4096)
    return config, config.shard_size or 4096


class ShardWriter:
    """Safetensors shards of whole batches under one folder, and their index, written last."""

    def __init__(self, folder: Path, plan: CapturePlan, shard_size: int) -> None:
        self.folder, self.plan, self.shard_size = folder, plan, shard_size
        self.shards: list[str] = []
        self.pending: list[tuple[Tensor, dict[str, Tensor]]] = []

    def add(self, ids: Tensor, acts: dict[str, Tensor]) -> None:
        """Keep a CPU copy of one batch; write a shard once ``shard_size`` prompts wait."""
        self.pending.append((ids, {s: t.to("cpu", copy=True) for s, t in acts.items()}))
        if sum(len(i) for i, _ in self.pending) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        name = f"shard-{len(self.shards):05d}.safetensors"
        tensors = {s: torch.cat([acts[s] for _, acts in self.pending]) for s in self.plan.sites}
        tensors["prompt_index"] = torch.cat([ids for ids, _ in self.pending])
        save_safetensors(self.folder / name, tensors, {"format": FORMAT})
        self.shards.append(name)
        self.pending.clear()

    def close(self, lm: LoadedModel) -> Path:
        """Write the last shard and the index file ``activations.json``.

        Returns:
            The folder.
        """
        if self.pending:
            self._flush()
        plan = self.plan
        index = {
            "format": FORMAT,
            "layers": list(plan.layers),
            "positions": list(plan.positions.labels),
            "provenance": plan.provenance(lm).to_dict(),
            "sites": list(plan.sites),
            "shards": self.shards,
        }
        write_json(self.folder / SHARD_INDEX, index)
        return self.folder
