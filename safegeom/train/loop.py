"""The optimizer loop of every training method: steps, checkpoints and the manifest.

:func:`run_steps` takes what :func:`~safegeom.train.runner.train` set up (the trainable, the
method's step loss, the run's settings) and runs AdamW from step 0 or from the last checkpoint of
a run it resumes (restoring optimizer, scheduler and step count, which fixes the data position).
Checkpoints are saved at step 0, every ``save_every`` steps and at the last step; the manifest is
rewritten after each (:mod:`safegeom.train.checkpoints`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from safegeom.distributed import all_or_none
from safegeom.errors import ArtifactError
from safegeom.train.checkpoints import check_finite_weights, load_trainer_state, save_checkpoint
from safegeom.train.config import RunConfig
from safegeom.train.data import ExampleOrder
from safegeom.train.fsdp import shard_optimizer_state
from safegeom.train.optim import make_optimizer, optimizer_step
from safegeom.train.parallel import (
    broadcast_parameters,
    check_resume_world,
    has_dropout,
    sum_values,
)
from safegeom.train.step import StepLoss
from safegeom.train.trajectory import TRAINER_STATE, Trajectory
from safegeom.train.wrap import Trainable

__all__ = ["run_steps"]


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
    # and the gradients are summed over the ranks (safegeom.train.parallel says why).
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
