"""The three consumers of the batch loop: tensors, float64 statistics and shards on disk.

Design (see docs/design.md, "Speed"):

- The loop (:func:`~safegeom.activations.engine.iter_capture`) runs batches longest first; results
  are put back in input order here.
- On CUDA :func:`capture` copies each batch into pinned CPU memory with an asynchronous copy; the
  copy is ordered on the compute stream, so the buffers can be reused by the next batch at once.
- Storage is in the model's dtype unless ``dtype`` says otherwise.

Three consumers share the loop: :func:`capture` (tensors in memory), :func:`capture_stats`
(float64 running means/covariances, never holding all activations) and :func:`capture_to_disk`
(sharded safetensors).

Each consumer is single-process. Under a launcher the entry points (the CLI, the audit and train
runners) install the sharded twins (:mod:`safegeom.execution`): each consumer then hands over to
:mod:`safegeom.parallel.capture`, where every rank runs its share of the very batches one process
would run, the results come back in input order (statistics are merged) and rank 0 alone writes
files.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from safegeom.activations.config import CaptureConfig
from safegeom.activations.engine import (
    RECORDERS,
    ShardWriter,
    disk_config,
    iter_capture,
    plan_batches,
)
from safegeom.activations.plan import plan_capture
from safegeom.activations.values import Activations, ActivationStats
from safegeom.artifacts import check_output_dir
from safegeom.errors import ConfigError
from safegeom.execution import twin
from safegeom.models.chat import EncodedSet
from safegeom.models.loading import LoadedModel
from safegeom.prompts import Prompts
from safegeom.stats import RunningStats

__all__ = [
    "RECORDERS",
    "ShardWriter",
    "capture",
    "capture_stats",
    "capture_to_disk",
    "contiguous_runs",
    "iter_capture",
    "plan_batches",
]


def capture(
    lm: LoadedModel,
    prompts: Prompts | EncodedSet,
    config: CaptureConfig = CaptureConfig(),
    *,
    progress: bool = True,
) -> Activations:
    """Capture activations of ``prompts`` into CPU tensors.

    Args:
        lm: a loaded model (:func:`safegeom.models.load_model`).
        prompts: a :class:`PromptSet`, an :class:`EncodedSet`, a prompt spec (``advbench:train``,
            a file) or strings.
        config: what to capture and how (:class:`CaptureConfig`: sites, layers, positions,
            storage dtype, batch size, system prompt, backend).
        progress: show a progress bar.

    Returns:
        :class:`Activations` with ``data[site]`` shaped ``[n_prompts, n_layers, n_positions, d]``
        in input order, in pinned CPU memory when the model is on CUDA.

    Raises:
        SafegeomError: bad prompts, sites, layers, positions or config values (see
            :func:`plan_capture`); ``stats`` or ``shard_size`` set (use :func:`capture_stats` or
            :func:`capture_to_disk`); NaN or inf in the activations.
    """
    if config.stats or config.shard_size is not None:
        mode = "capture_stats" if config.stats else "capture_to_disk"
        raise ConfigError(f"capture() returns tensors in memory; use {mode}() for this config")
    if (shared := twin("capture")) is not None:
        return shared(lm, prompts, config, progress=progress)
    plan = plan_capture(lm, prompts, config)
    n = len(plan.encoded)
    shape = (n, len(plan.layers), plan.positions.n_positions, lm.d_model)
    pinned = lm.device.type == "cuda"
    out = {s: torch.empty(shape, dtype=plan.dtype, pin_memory=pinned) for s in plan.sites}
    for ids, acts in iter_capture(lm, plan, progress=progress):
        # Write each batch straight to its input positions: runs of consecutive prompts are one
        # (asynchronous, on CUDA) slice copy, so the output stays pinned and is never re-copied.
        for row, start, length in contiguous_runs(ids.tolist()):
            for site, tensor in acts.items():
                out[site][start : start + length].copy_(
                    tensor[row : row + length], non_blocking=pinned
                )
    if pinned:
        torch.cuda.synchronize(lm.device)
    return Activations(out, plan.layers, plan.positions.labels, plan.provenance(lm))


def contiguous_runs(ids: Sequence[int]) -> Iterator[tuple[int, int, int]]:
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
    config: CaptureConfig = CaptureConfig(),
    *,
    progress: bool = True,
) -> ActivationStats:
    """Float64 running means (and covariances over ``d``) of activations, never holding them all.

    Takes the config of :func:`capture` (``stats`` is implied; ``CaptureConfig(stats=True,
    covariance=True)`` adds the covariances) with either backend; ``progress`` shows a progress bar.

    Returns:
        :class:`ActivationStats`; means are ``[n_layers, n_positions, d]`` per site, covariances
        ``[n_layers, n_positions, d, d]`` when ``covariance=True``.
    """
    cfg = dataclasses.replace(config, stats=True)
    if (shared := twin("capture_stats")) is not None:
        return shared(lm, prompts, cfg, progress=progress)
    plan = plan_capture(lm, prompts, cfg)
    shape = (len(plan.layers), plan.positions.n_positions, lm.d_model)
    running = {
        s: RunningStats(shape, covariance=cfg.covariance, device=lm.device) for s in plan.sites
    }
    n_forward = 0
    for _, acts in iter_capture(lm, plan, progress=progress):
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
    config: CaptureConfig = CaptureConfig(),
    *,
    progress: bool = True,
) -> Path:
    """Stream activations into sharded safetensors under ``out_dir`` (read back with
    :func:`safegeom.activations.load_activations`), with either backend.

    Each shard holds about ``shard_size`` prompts (whole batches; default 4096) and their input
    indices; the index file ``activations.json`` is written last, so a folder without it is
    incomplete. ``out_dir`` is checked before any work; ``progress`` shows a progress bar.

    Returns:
        ``out_dir``.

    Raises:
        OutputPathError: ``out_dir`` is a file or cannot be written.
    """
    if (shared := twin("capture_to_disk")) is not None:
        return shared(lm, prompts, out_dir, config, progress=progress)
    folder = check_output_dir(out_dir)
    cfg, shard_size = disk_config(config)
    plan = plan_capture(lm, prompts, cfg)
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder, plan, shard_size)
    for ids, acts in iter_capture(lm, plan, progress=progress):
        writer.add(ids, acts)
    return writer.close(lm)
