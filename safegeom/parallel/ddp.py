"""Training over N processes (DDP-style data parallelism) with the results of one process.

Every rank holds the whole model and the whole data set. A step's global batch of ``batch_size``
examples (the config value is the *global* batch, whatever N) is cut into N contiguous slices of
``batch_size / N`` examples, one per rank; each rank computes its *share* of the loss, the part of
the one-process loss that its examples contribute (its answer tokens' cross-entropy summed and
divided by the global batch's answer-token count, and so on: see
:class:`~safegeom.training.step.StepLoss`), so the shares add up to the one-process loss and their
gradients, summed over the ranks by :func:`sum_gradients`, to the one-process gradient. Every rank
then takes the same optimizer step on the same full parameters, so the parameters, the optimizer
state and the trainer state saved at a checkpoint are those of one process, whatever N.

Why explicit all-reduce instead of ``torch.nn.parallel.DistributedDataParallel``: the methods
make several forwards per step (the RefusalGuard penalty's decoder-only forward, the KL
reference with the adapters off), the ReFT edit is not the module whose forward runs, and the
loss normalisation must be over the global batch; one sum of the gradients after the backward
is exact for all of them. The cost is that the reduction does not overlap the backward.

Full-parameter training can instead shard the weights over the ranks (FSDP2,
:mod:`safegeom.parallel.fsdp`), with the same step and the same checkpoints.

What depends on N: only the dropout masks (each rank draws its own, from a seed of the run's seed,
the step and the rank), so a run whose model has dropout resumes only with the number of
processes it was saved with (:func:`check_resume_world`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from safegeom.errors import ConfigError

__all__ = [
    "broadcast_parameters",
    "check_global_batch",
    "check_resume_world",
    "has_dropout",
    "refuse_sharded_training",
    "reseed_step",
    "sum_gradients",
    "sum_values",
]

BUCKET = 1 << 24
"""Elements per all-reduce call of :func:`sum_gradients` (64 MiB of float32)."""


def check_global_batch(batch_size: int, world: int) -> None:
    """Refuse a global batch that ``world`` processes cannot share equally.

    Raises:
        ConfigError: ``batch_size`` is not a multiple of ``world``; the message names both.
    """
    if batch_size % world:
        raise ConfigError(
            f"batch_size {batch_size} is the global batch and must be divisible by the number of "
            f"processes {world}: pass a multiple of {world} (each process takes an equal slice)"
        )


def reseed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch's generators for ``step`` on ``rank`` (each rank its own dropout masks)."""
    torch.manual_seed((seed * 1_000_003 + step) * 4_099 + rank)


def has_dropout(module: nn.Module) -> bool:
    """Whether training ``module`` draws random numbers: a dropout layer or a dropout probability
    (``*dropout``, ``*pdrop`` in a config) above 0 anywhere inside."""
    for sub in module.modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p > 0:
            return True
        config = getattr(sub, "config", None)
        items = config.to_dict().items() if hasattr(config, "to_dict") else ()
        for key, value in items:
            if (
                key.endswith(("dropout", "pdrop", "dropout_prob", "dropout_rate"))
                and isinstance(value, float)
                and value > 0
            ):
                return True
    return False


def check_resume_world(saved: int, world: int, dropout: bool, where: str) -> None:
    """Refuse resuming with ``world`` processes a run saved with ``saved`` when that changes the math.

    Raises:
        ConfigError: the model has dropout and ``world`` differs from ``saved``.
    """
    if saved != world and dropout:
        raise ConfigError(
            f"cannot resume {where} with {world} process(es): it was trained with {saved} and its "
            f"model has dropout, whose masks depend on the number of processes; resume with "
            f"{saved} process(es), or train without dropout (--lora-dropout 0)"
        )


def _buckets(params: Sequence[nn.Parameter]) -> list[list[int]]:
    """Indices of ``params`` grouped by device and dtype, at most :data:`BUCKET` elements a group
    (one parameter larger than that is a group alone)."""
    groups: dict[tuple[Any, Any], list[list[int]]] = {}
    for i, p in enumerate(params):
        runs = groups.setdefault((p.device, p.dtype), [[]])
        if runs[-1] and sum(params[j].numel() for j in runs[-1]) + p.numel() > BUCKET:
            runs.append([])
        runs[-1].append(i)
    return [run for runs in groups.values() for run in runs if run]


def sum_gradients(params: Sequence[nn.Parameter], world: int) -> None:
    """Replace every parameter's gradient by its sum over the ``world`` ranks (a collective).

    A parameter without a gradient on every rank keeps none (as in one process, where the
    optimizer then skips it); one with a gradient on some rank gets the sum, zeros standing in
    for the ranks without one. A no-op in one process.
    """
    if world == 1 or not params:
        return
    dist = torch.distributed
    present = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    dist.all_reduce(present)
    has = [bool(x > 0) for x in present.tolist()]
    for run in _buckets(params):
        chosen = [params[i] for i in run if has[i]]
        if not chosen:
            for i in run:
                params[i].grad = None
            continue
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in chosen]
        )
        dist.all_reduce(flat)
        offset = 0
        for p in chosen:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        for i in run:
            if not has[i]:
                params[i].grad = None


def broadcast_parameters(params: Sequence[nn.Parameter], world: int) -> None:
    """Give every rank rank 0's values of ``params`` (a collective; a no-op in one process).

    FSDP shards (DTensors) are left as they are: each is its own rank's part of a weight, and
    every rank loads the same full weights before :func:`~safegeom.parallel.fsdp.shard_trainable`
    shards them.
    """
    if world == 1:
        return
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for p in params:
            if not isinstance(p, DTensor):
                torch.distributed.broadcast(p.data, src=0)


def sum_values(
    loss: torch.Tensor, terms: dict[str, torch.Tensor], world: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The shares ``loss`` and ``terms`` summed over the ranks: the global batch's values.

    Every rank must hold the same term names. Returns detached scalars (the inputs themselves in
    one process).
    """
    if world == 1:
        return loss.detach(), terms
    names = sorted(terms)
    flat = torch.stack([loss.detach().float(), *(terms[k].detach().float() for k in names)])
    torch.distributed.all_reduce(flat)
    return flat[0], {k: flat[i + 1] for i, k in enumerate(names)}


def refuse_sharded_training(acc: Accelerator) -> None:
    """Refuse an accelerate setup whose engine shards the model (FSDP, DeepSpeed, Megatron-LM).

    The trainers never hand the model to such an engine: they train DDP-style, or shard
    ``sft`` themselves with FSDP2 (:func:`safegeom.parallel.fsdp.use_fsdp` calls this for the
    setups other than FSDP).

    Raises:
        ConfigError: the accelerator is set up for one of them.
    """
    kind = str(getattr(acc.distributed_type, "value", acc.distributed_type))
    if kind.upper() in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise ConfigError(
            f"training under {kind} is not yet supported: every process holds the whole model "
            "(DDP-style data parallelism), or for sft with --fsdp (or an accelerate FSDP "
            "config) its shard of every weight; launch without --use_deepspeed / "
            "--use_megatron_lm (accelerate launch --multi_gpu, or --use_fsdp for sft)"
        )
