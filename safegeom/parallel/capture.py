"""Capture over several processes: each rank runs its share of the batches, rank 0 writes.

The sharded twins of :func:`~safegeom.activations.capture`, :func:`~safegeom.activations.capture_stats`
and :func:`~safegeom.activations.capture_to_disk`: those hand over to them when the entry points
installed them (:func:`safegeom.parallel.dispatch.sharding`) and a launcher started more than one
process; nothing changes for one process.

- Every rank tokenizes its round-robin share of the prompts and receives the others' (the
  tokenizing is split too), plans the whole set, the ranks agree on the smallest batch size any
  of them chose, and the batch plan one process would run (longest first) is dealt round robin
  (:func:`~safegeom.parallel.ranks.deal`). Each rank thus runs exactly the batches of one process,
  and the activations equal one process's bit for bit.
- In memory: every rank returns the whole :class:`Activations`, in input order (so code that uses
  them runs unchanged on every rank; the CLI writes on rank 0 only). Every rank then holds all
  activations: for sets that do not fit that many times in host memory, use statistics or disk.
- Statistics: each rank accumulates its float64 moments, and every rank merges all ranks' in rank
  order with the Chan merge of :class:`~safegeom.stats.RunningStats` (equal to one process to
  float64 rounding; the counts exactly).
- To disk: in rounds of one batch per rank, rank 0 receives the round's batches and writes them in
  plan order, so the shards are those one process writes (at most a shard and a round held); the
  others write nothing.

Each step between collectives runs under :func:`~safegeom.parallel.ranks.all_or_none`, so a bad
input, NaN activations or a failed write on one rank stops every rank with that rank's message.

Launch::

    accelerate launch --num_processes 2 -m safegeom.cli capture MODEL --prompts SPEC --out FILE
    accelerate launch --multi_gpu --num_processes 2 -m safegeom.cli capture ...  # CPUs only

Every rank must call the same capture functions in the same order (they are collectives).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from safegeom.activations.config import CaptureConfig
from safegeom.activations.engine import ShardWriter, disk_config, iter_capture, plan_batches
from safegeom.activations.plan import CapturePlan, encode_for, plan_capture
from safegeom.activations.values import Activations, ActivationStats
from safegeom.artifacts import check_output_dir
from safegeom.models.loading import LoadedModel
from safegeom.parallel.encoding import encode_dealt, load_everywhere
from safegeom.parallel.ranks import (
    all_or_none,
    collect,
    deal,
    gather,
    is_main,
    main_only,
    world_size,
)
from safegeom.prompts import Prompts
from safegeom.stats import RunningStats

__all__ = ["capture_sharded", "capture_stats_sharded", "capture_to_disk_sharded", "shard_plan"]

Batch = tuple[Tensor, dict[str, Tensor]]


def shard_plan(
    lm: LoadedModel, prompts: Prompts, cfg: CaptureConfig
) -> tuple[CapturePlan, list[list[int]]]:
    """The plan every rank shares (batch size: the smallest any rank chose) and this rank's batches.

    Returns:
        ``(plan, batches)``: the plan of the whole prompt set, and this rank's share of its
        batches (prompt indices, longest first).

    Raises:
        SafegeomError: planning failed on any rank (bad prompts, sites, layers, positions).
    """
    # every rank loads the prompts and tokenizes its share of them
    encoded = encode_for(lm, prompts, cfg.system, load=load_everywhere, encode=encode_dealt)
    plan = all_or_none(plan_capture, lm, encoded, cfg)
    size = min(collect(plan.batch_size, to="all") or [plan.batch_size])
    if size != plan.batch_size:
        plan = dataclasses.replace(plan, batch_size=size)
    return plan, deal(plan_batches(plan))


def _progress(progress: bool) -> bool:
    return progress and is_main()


def capture_sharded(
    lm: LoadedModel, prompts: Prompts, cfg: CaptureConfig, *, progress: bool = True
) -> Activations:
    """:func:`~safegeom.activations.capture` over every process of the job.

    Returns:
        On every rank, :class:`Activations` of all prompts in input order (CPU tensors).
    """
    plan, mine = shard_plan(lm, prompts, cfg)
    shape = (0, len(plan.layers), plan.positions.n_positions, lm.d_model)

    def local() -> tuple[list[int], dict[str, Tensor]]:
        ids: list[int] = []
        parts: dict[str, list[Tensor]] = {s: [] for s in plan.sites}
        for rows, acts in iter_capture(lm, plan, progress=_progress(progress), batches=mine):
            ids.extend(rows.tolist())
            for site, tensor in acts.items():
                parts[site].append(tensor.to("cpu", copy=True))
        empty = torch.empty(shape, dtype=plan.dtype)
        return ids, {s: torch.cat(p) if p else empty for s, p in parts.items()}

    ids, data = all_or_none(local)
    n = len(plan.encoded)
    out = {s: gather(data[s], ids, n, to="all") for s in plan.sites}
    return Activations(out, plan.layers, plan.positions.labels, plan.provenance(lm))


def capture_stats_sharded(
    lm: LoadedModel, prompts: Prompts, cfg: CaptureConfig, *, progress: bool = True
) -> ActivationStats:
    """:func:`~safegeom.activations.capture_stats` over every process of the job.

    Returns:
        On every rank, the same :class:`ActivationStats`: each site's moments merged over the
        ranks in rank order; ``n_forward`` sums every rank's forward passes.
    """
    plan, mine = shard_plan(lm, prompts, cfg)
    shape = (len(plan.layers), plan.positions.n_positions, lm.d_model)

    def local() -> tuple[dict[str, RunningStats], int]:
        running = {
            s: RunningStats(shape, covariance=cfg.covariance, device=lm.device) for s in plan.sites
        }
        n_forward = 0
        for _, acts in iter_capture(lm, plan, progress=_progress(progress), batches=mine):
            n_forward += 1
            for site, tensor in acts.items():
                running[site].update(tensor)
        # CPU copies: an accumulator on a GPU would unpickle onto that GPU on every rank
        cpu = {
            s: RunningStats(shape, covariance=cfg.covariance).merge(r) for s, r in running.items()
        }
        return cpu, n_forward

    parts = collect(all_or_none(local), to="all") or []
    moments = {}
    for site in plan.sites:
        merged = RunningStats(shape, covariance=cfg.covariance, device=lm.device)
        for running, _ in parts:
            merged = merged.merge(running[site])
        moments[site] = merged.finalize()
    n_forward = sum(count for _, count in parts)
    prov = plan.provenance(lm)
    return ActivationStats(moments, plan.layers, plan.positions.labels, prov, n_forward)


def capture_to_disk_sharded(
    lm: LoadedModel,
    prompts: Prompts,
    out_dir: str | os.PathLike[str],
    config: CaptureConfig,
    *,
    progress: bool = True,
) -> Path:
    """:func:`~safegeom.activations.capture_to_disk` over every process of the job; rank 0 writes.

    Returns:
        ``out_dir`` on every rank, once rank 0 has written the index (the folder is complete).

    Raises:
        OutputPathError: ``out_dir`` cannot be written (checked by rank 0, before any work).
    """
    main_only(check_output_dir)(out_dir)
    folder = Path(out_dir)
    cfg, shard_size = all_or_none(disk_config, config)
    plan, mine = shard_plan(lm, prompts, cfg)
    n_rounds = -(-len(plan_batches(plan)) // world_size())
    batches = iter_capture(lm, plan, progress=_progress(progress), batches=mine)
    writer: ShardWriter | None = None
    received: list[Batch | None] = []

    def step(last: bool) -> Batch | None:
        """Run this rank's next batch; rank 0 also writes the batches received last round."""
        nonlocal writer
        mine_next = _drain(batches) if last else next(batches, None)
        if is_main():
            if writer is None:
                folder.mkdir(parents=True, exist_ok=True)
                writer = ShardWriter(folder, plan, shard_size)
            for item in received:
                if item is not None:
                    writer.add(*item)
            if last:
                writer.close(lm)
        if mine_next is None:
            return None
        ids, acts = mine_next
        return ids, {s: t.to("cpu", copy=True) for s, t in acts.items()}

    for _ in range(n_rounds):
        batch = all_or_none(step, False)
        received = collect(batch, to="main") or []
    all_or_none(step, True)
    return folder


def _drain(batches: Iterator[Batch]) -> None:
    """Finish the batch loop (its NaN check runs at the end); no batch is left by then."""
    for _ in batches:
        raise AssertionError("a rank has more batches than rounds")
