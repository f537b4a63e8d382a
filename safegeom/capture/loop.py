"""The one batch loop of capture, and its three consumers.

Design (see DESIGN.md, "Performance design"):

- Prompts are sorted by length (stable) to cut padding, and put back in input order at the end.
- Each backend (``hooks``, ``transformer_lens``) fills preallocated device buffers
  ``[batch, n_layers, n_positions, d]`` for one batch; the loop here collates, indexes the
  positions, checks for NaN/inf (one device-side flag, read once at the end) and yields.
- On CUDA :func:`capture` copies each batch into pinned CPU memory with an asynchronous copy; the
  copy is ordered on the compute stream, so the buffers can be reused by the next batch at once.
- Storage is in the model's dtype unless ``dtype`` says otherwise.

Three consumers share the loop: :func:`capture` (tensors in memory), :func:`capture_stats`
(float64 running means/covariances, never holding all activations) and :func:`capture_to_disk`
(sharded safetensors).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from safegeom.activations import FORMAT, SHARD_INDEX, Activations, ActivationStats
from safegeom.artifacts import check_output_dir, save_safetensors, write_json
from safegeom.batching import longest_first
from safegeom.capture.config import CaptureConfig
from safegeom.capture.hooks_backend import HookRecorder
from safegeom.capture.plan import CapturePlan, plan_capture, resolve_config
from safegeom.capture.transformer_lens import BridgeRecorder
from safegeom.errors import ConfigError, NonFiniteError
from safegeom.models.chat import ChatBatch, EncodedSet, collate_left
from safegeom.models.loading import LoadedModel
from safegeom.prompts import Prompts
from safegeom.stats import RunningStats

__all__ = ["RECORDERS", "capture", "capture_stats", "capture_to_disk", "iter_capture"]


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
    lm: LoadedModel, plan: CapturePlan, *, progress: bool | None = None
) -> Iterator[tuple[Tensor, dict[str, Float[Tensor, "batch layer pos d"]]]]:
    """Run the forward passes and yield ``(prompt_indices, {site: activations})`` per batch.

    The yielded tensors are *views of reused device buffers*: copy what you keep before asking
    for the next batch. Batches come in length order, not input order; ``prompt_indices`` says
    which prompts each row holds. ``progress`` defaults to ``plan.config.progress``.

    Raises:
        ConfigError: an unknown backend.
        NonFiniteError: NaN or inf in the captured activations (checked once, at the end).
    """
    if plan.backend not in RECORDERS:
        raise ConfigError(f"unknown capture backend {plan.backend!r}: use {' or '.join(RECORDERS)}")
    recorder = RECORDERS[plan.backend](lm, plan)
    show = plan.config.progress if progress is None else progress
    n = len(plan.encoded)
    pad = lm.tokenizer.pad_token_id
    device = lm.device
    finite = torch.ones((), dtype=torch.bool, device=device)
    bar = tqdm(total=n, desc=recorder.label, unit="prompt", disable=not show)
    for ids in longest_first([len(e) for e in plan.encoded], plan.batch_size):
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
            f"NaN or inf in captured activations of {lm.name}; try dtype=float32 or check the weights"
        )


def capture(
    lm: LoadedModel,
    prompts: Prompts | EncodedSet,
    config: CaptureConfig | None = None,
    **fields: Any,
) -> Activations:
    """Capture activations of ``prompts`` into CPU tensors.

    Args:
        lm: a loaded model (:func:`safegeom.models.load_model`).
        prompts: a :class:`PromptSet`, an :class:`EncodedSet`, a prompt spec (``advbench:train``,
            a file) or strings.
        config: what to capture (:class:`CaptureConfig`); its fields may also be given as
            keywords (``sites``, ``layers``, ``positions``, ``dtype``, ``batch_size``, ``system``,
            ``progress``, ``backend``), which replace the config's.

    Returns:
        :class:`Activations` with ``data[site]`` shaped ``[n_prompts, n_layers, n_positions, d]``
        in input order, in pinned CPU memory when the model is on CUDA.

    Raises:
        SafegeomError: bad prompts, sites, layers, positions or config values (see
            :func:`plan_capture`); ``stats`` or ``shard_size`` set (use :func:`capture_stats` or
            :func:`capture_to_disk`); NaN or inf in the activations.
    """
    cfg = resolve_config(config, fields)
    if cfg.stats or cfg.shard_size is not None:
        mode = "capture_stats" if cfg.stats else "capture_to_disk"
        raise ConfigError(f"capture() returns tensors in memory; use {mode}() for this config")
    plan = plan_capture(lm, prompts, cfg)
    n = len(plan.encoded)
    shape = (n, len(plan.layers), plan.positions.n_positions, lm.d_model)
    pinned = lm.device.type == "cuda"
    out = {s: torch.empty(shape, dtype=plan.dtype, pin_memory=pinned) for s in plan.sites}
    for ids, acts in iter_capture(lm, plan):
        # Write each batch straight to its input positions: runs of consecutive prompts are one
        # (asynchronous, on CUDA) slice copy, so the output stays pinned and is never re-copied.
        for row, start, length in _runs(ids.tolist()):
            for site, tensor in acts.items():
                out[site][start : start + length].copy_(
                    tensor[row : row + length], non_blocking=pinned
                )
    if pinned:
        torch.cuda.synchronize(lm.device)
    return Activations(out, plan.layers, plan.positions.labels, plan.provenance(lm))


def _runs(ids: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """Split batch rows into runs of consecutive prompt indices: (first row, first index, length)."""
    row = 0
    while row < len(ids):
        length = 1
        while row + length < len(ids) and ids[row + length] == ids[row] + length:
            length += 1
        yield row, ids[row], length
        row += length


def capture_stats(
    lm: LoadedModel,
    prompts: Prompts | EncodedSet,
    config: CaptureConfig | None = None,
    **fields: Any,
) -> ActivationStats:
    """Float64 running means (and covariances over ``d``) of activations, never holding them all.

    Takes the config of :func:`capture` (``stats`` is implied; ``covariance=True`` adds the
    covariances) with either backend.

    Returns:
        :class:`ActivationStats`; means are ``[n_layers, n_positions, d]`` per site, covariances
        ``[n_layers, n_positions, d, d]`` when ``covariance=True``.
    """
    cfg = resolve_config(config, fields, stats=True)
    plan = plan_capture(lm, prompts, cfg)
    shape = (len(plan.layers), plan.positions.n_positions, lm.d_model)
    running = {
        s: RunningStats(shape, covariance=cfg.covariance, device=lm.device) for s in plan.sites
    }
    n_forward = 0
    for _, acts in iter_capture(lm, plan):
        n_forward += 1
        for site, tensor in acts.items():
            running[site].update(tensor)
    moments = {site: stats.finalize() for site, stats in running.items()}
    prov = plan.provenance(lm)
    return ActivationStats(moments, plan.layers, plan.positions.labels, prov, n_forward)


def capture_to_disk(
    lm: LoadedModel,
    prompts: Prompts | EncodedSet,
    out_dir: str | os.PathLike[str],
    config: CaptureConfig | None = None,
    **fields: Any,
) -> Path:
    """Stream activations into sharded safetensors under ``out_dir`` (read back with
    :func:`safegeom.activations.load_activations`), with either backend.

    Each shard holds about ``shard_size`` prompts (whole batches; default 4096) and their input
    indices; the index file ``activations.json`` is written last, so a folder without it is
    incomplete. ``out_dir`` is checked before any work.

    Returns:
        ``out_dir``.

    Raises:
        OutputPathError: ``out_dir`` is a file or cannot be written.
    """
    folder = check_output_dir(out_dir)
    cfg = resolve_config(config, fields)
    if cfg.shard_size is None:
        cfg = resolve_config(cfg, {}, shard_size=4096)
    shard_size = cfg.shard_size or 4096
    plan = plan_capture(lm, prompts, cfg)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[str] = []
    pending: list[tuple[Tensor, dict[str, Tensor]]] = []

    def flush() -> None:
        name = f"shard-{len(shards):05d}.safetensors"
        tensors = {s: torch.cat([acts[s] for _, acts in pending]) for s in plan.sites}
        tensors["prompt_index"] = torch.cat([ids for ids, _ in pending])
        save_safetensors(folder / name, tensors, {"format": FORMAT})
        shards.append(name)
        pending.clear()

    for ids, acts in iter_capture(lm, plan):
        pending.append((ids, {s: t.to("cpu", copy=True) for s, t in acts.items()}))
        if sum(len(i) for i, _ in pending) >= shard_size:
            flush()
    if pending:
        flush()
    index = {
        "format": FORMAT,
        "layers": list(plan.layers),
        "positions": list(plan.positions.labels),
        "provenance": plan.provenance(lm).to_dict(),
        "sites": list(plan.sites),
        "shards": shards,
    }
    write_json(folder / SHARD_INDEX, index)
    return folder
