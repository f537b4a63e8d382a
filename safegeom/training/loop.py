"""The optimizer loop of every training method: steps, checkpoints and the manifest.

:func:`run_steps` takes what :func:`~safegeom.training.runner.train` set up (the trainable, the
method's step loss, the run's settings) and runs AdamW from step 0 or from the last checkpoint of
a run it resumes (restoring optimizer, scheduler and step count, which fixes the data position).
Checkpoints are saved at step 0, every ``save_every`` steps and at the last step; the manifest is
rewritten after each (:mod:`safegeom.training.checkpoints`).

This is where training meets the processes of a launcher (with the runner, one of the modules
outside :mod:`safegeom.parallel` that call rank primitives): :func:`optimizer_step` computes this
rank's share of the step and sums the gradients (:mod:`safegeom.parallel.ddp`, FSDP:
:mod:`safegeom.parallel.fsdp`), :func:`save_checkpoint` has rank 0 alone write, and
:func:`check_finite_weights` checks every rank's shards. In one process they are plain calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from safegeom.errors import ArtifactError, TrainingDiverged
from safegeom.parallel.ddp import (
    broadcast_parameters,
    check_resume_world,
    has_dropout,
    reseed_step,
    sum_gradients,
    sum_values,
)
from safegeom.parallel.fsdp import (
    all_finite,
    full_optimizer_state,
    full_state,
    shard_optimizer_state,
)
from safegeom.parallel.ranks import all_or_none, alone, broadcast
from safegeom.training.checkpoints import load_trainer_state, write_checkpoint
from safegeom.training.config import RunConfig
from safegeom.training.data import ExampleOrder
from safegeom.training.optim import make_optimizer, restore_schedule
from safegeom.training.step import StepLoss
from safegeom.training.trainable import Trainable
from safegeom.training.trajectory import (
    TRAINER_STATE,
    CheckpointRecord,
    Trajectory,
    checkpoint_dirname,
)

__all__ = ["check_finite_weights", "optimizer_step", "run_steps", "save_checkpoint"]


def _postfix(terms: dict[str, float]) -> dict[str, str]:
    return {k: f"{v:.4f}" for k, v in terms.items()}


def run_steps(
    acc: Accelerator,
    trainable: Trainable,
    step_loss: StepLoss,
    n_examples: int,
    config: RunConfig,
    out_dir: Path,
    base: str,
    base_hash: str,
    previous: Trajectory | None,
    progress: bool,
    callback: Callable[[int, float], None] | None,
) -> Trajectory:
    """Run the optimizer steps from step 0 (``previous`` None) or from ``previous``'s last
    checkpoint; return the trajectory written."""
    from transformers import __version__ as hf_version

    world, rank = acc.num_processes, acc.process_index
    params = trainable.parameters()
    broadcast_parameters(params, world)  # the same start on every rank, whatever the init
    raw_opt, scheduler = make_optimizer(params, config)
    # The module is not wrapped in DDP: each rank computes its share of the global batch's loss
    # and the gradients are summed over the ranks (safegeom.parallel.ddp says why).
    optimizer = acc.prepare_optimizer(raw_opt)
    settings = config.train
    order = ExampleOrder(n_examples, settings.seed)

    def indices_at(step: int) -> list[int]:
        """The step's global batch (each rank computes on its slice of it)."""
        return [order.index(step * settings.batch_size + i) for i in range(settings.batch_size)]

    if previous is None:
        versions = {"torch": torch.__version__, "transformers": hf_version}
        traj = Trajectory(out_dir, base, base_hash, config.to_dict(), versions=versions)
        trainable.module.eval()

        def first_loss() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with torch.no_grad(), acc.autocast():
                return step_loss(indices_at(0), 0, part=(rank, world))

        first, first_terms = sum_values(*all_or_none(first_loss), world)
        traj = save_checkpoint(
            acc,
            trainable,
            optimizer,
            scheduler,
            traj,
            0,
            float(first),
            terms={k: float(v) for k, v in first_terms.items()},
        )
        start = 0
    else:
        traj = previous
        start = traj.last.step
        opt_state, sched_state, meta = load_trainer_state(out_dir / traj.last.path / TRAINER_STATE)
        if int(meta["step"]) != start:
            raise ArtifactError(f"trainer state of {traj.last.path} is not at step {start}")
        check_resume_world(
            int(meta.get("num_processes", 1)), world, has_dropout(trainable.model), str(out_dir)
        )
        optimizer.load_state_dict(shard_optimizer_state(opt_state, optimizer))
        scheduler.load_state_dict(sched_state)
        restore_schedule(raw_opt, scheduler, config, start)  # a longer run: its own schedule
    log = [dict(r) for r in traj.log if int(r["step"]) <= start]

    bar = tqdm(
        total=settings.steps,
        initial=start,
        desc=f"{config.method} {config.task}",
        disable=not progress or not acc.is_main_process,
    )
    sums: dict[str, list[float]] = {}
    total, count = 0.0, 0
    try:
        for step in range(start, settings.steps):
            loss, terms = optimizer_step(
                acc,
                trainable,
                step_loss,
                optimizer,
                scheduler,
                indices_at(step),
                step,
                grad_clip=settings.grad_clip,
                lr=config.lr,
                saved=traj.last.step,
                seed=settings.seed,
            )
            value, values = float(loss), {k: float(v) for k, v in terms.items()}
            total, count, done = total + value, count + 1, step + 1
            for key, v in values.items():
                sums.setdefault(key, []).append(v)
            log.append({"step": done, "loss": value, **values})
            bar.update(1)
            bar.set_postfix(_postfix({"loss": value, **values}), refresh=False)
            if done % settings.save_every == 0 or done == settings.steps:
                check_finite_weights(params, done, traj, config.lr)
                traj = dataclasses.replace(traj, log=tuple(log))
                means = {k: sum(v) / len(v) for k, v in sums.items()}  # over steps that have it
                traj = save_checkpoint(
                    acc,
                    trainable,
                    optimizer,
                    scheduler,
                    traj,
                    done,
                    total / count,
                    terms=means,
                    complete=done == settings.steps,
                )
                total, count, sums = 0.0, 0, {}
            if callback is not None:  # an error on one rank stops every rank
                all_or_none(callback, done, value)
    finally:
        bar.close()
    trainable.module.eval()
    return traj


def optimizer_step(
    acc: Accelerator,
    trainable: Trainable,
    step_loss: StepLoss,
    optimizer: Any,
    scheduler: Any,
    indices: list[int],
    step: int,
    *,
    grad_clip: float | None,
    lr: float,
    saved: int,
    seed: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step of any method: loss, backward, clip, AdamW and schedule steps.

    ``indices`` is the step's global batch; under ``acc.num_processes`` > 1 each rank computes
    its share on its slice (:mod:`safegeom.parallel.ddp`), the gradients are summed over the
    ranks (by FSDP's reduce-scatter when the weights are sharded), and every rank takes the
    same step (its dropout masks seeded from ``seed``, the step and the rank). A failure on one
    rank (a non-finite loss, an error in the forward) stops every rank with that rank's message.
    ``saved`` is the last saved checkpoint's step (named in the divergence message).

    Returns:
        The step's ``(loss, terms)`` over the global batch (nats per answer token or per
        example, as one process computes them), detached.

    Raises:
        TrainingDiverged: the loss is not finite.
        SafegeomError: another rank failed (the message names it and its error).
    """
    world, rank = acc.num_processes, acc.process_index

    def local() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        trainable.module.train()
        if world > 1:
            reseed_step(seed, step, rank)
        with acc.autocast():
            loss, terms = step_loss(indices, step, part=(rank, world))
        if not torch.isfinite(loss.detach()).all():
            raise TrainingDiverged(
                f"training diverged at step {step + 1}: the loss is {float(loss):.4g}; the run "
                f"keeps its checkpoints up to step {saved} and is not complete; "
                f"lower --lr (now {lr:g}) or raise --warmup-steps"
            )
        acc.backward(loss)
        return loss.detach(), terms

    loss, terms = all_or_none(local)
    params = trainable.parameters()
    if not trainable.sharded:  # FSDP has summed them in its reduce-scatter
        sum_gradients(params, world)
    loss, terms = sum_values(loss, terms, world)
    if grad_clip:
        acc.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, terms


def check_finite_weights(
    params: list[torch.nn.Parameter], step: int, traj: Trajectory, lr: float
) -> None:
    """Raise :class:`TrainingDiverged` when a trained weight is NaN or infinite at ``step``
    (every rank's shards under FSDP: then a collective)."""
    if all_finite(params):
        return
    raise TrainingDiverged(
        f"training diverged at step {step}: the weights are no longer finite; the run keeps its "
        f"checkpoints up to step {traj.last.step} and is not complete; lower --lr (now {lr:g})"
    )


def save_checkpoint(
    acc: Accelerator,
    trainable: Trainable,
    optimizer: Any,
    scheduler: Any,
    traj: Trajectory,
    step: int,
    loss: float,
    *,
    terms: Mapping[str, float] | None = None,
    complete: bool = False,
) -> Trajectory:
    """Save the checkpoint at ``step`` (:func:`~safegeom.training.checkpoints.write_checkpoint`).

    Rank 0 alone writes (the weights and optimizer state are the same on every rank, or gathered
    from every rank's shards under FSDP, in the form one process saves); every rank then holds
    rank 0's trajectory, and a failure while writing stops every rank with rank 0's message.
    ``terms``: the mean loss terms since the previous checkpoint (recorded with it).

    Returns:
        The trajectory with the new checkpoint, as written to ``trajectory.json``.
    """
    record = CheckpointRecord(
        step=step, loss=loss, path=checkpoint_dirname(step), terms=terms or {}
    )

    def gather() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return full_state(trainable.module), full_optimizer_state(optimizer)

    # FSDP: every rank takes part in gathering the weights and moments that rank 0 writes.
    gathered = all_or_none(gather) if trainable.sharded else None

    def write() -> str | None:
        if not acc.is_main_process:
            return None
        with alone():  # an export (Safe LoRA, LoX) runs whole here, waiting for no other rank
            return write_checkpoint(
                trainable,
                trainable.module if gathered is not None else acc.unwrap_model(trainable.module),
                traj,
                record,
                optimizer_state=gathered[1] if gathered is not None else optimizer.state_dict(),
                scheduler_state=scheduler.state_dict(),
                num_processes=acc.num_processes,
                weights=None if gathered is None else gathered[0],
                complete=complete,
            )

    digest = broadcast(all_or_none(write))  # rank 0's weight hash on every rank
    return traj.with_checkpoint(dataclasses.replace(record, weight_hash=digest), complete=complete)
