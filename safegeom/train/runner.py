"""The fine-tuning loop of every method (sft, lora, refusalguard, adaptive, kl): a trajectory.

:func:`train` loads ``MODEL`` with :func:`safegeom.models.load_model`, tokenizes the task with
response-only labels (:mod:`safegeom.train.data`), and runs AdamW under ``accelerate`` (one
process by default; under ``accelerate launch``/``torchrun`` N processes share each step's global
batch of ``batch_size``, with one process's results: :mod:`safegeom.train.parallel`, the weights
sharded with ``fsdp``: :mod:`safegeom.train.fsdp`; rank 0 alone writes). Checkpoints are saved at step 0, every ``save_every`` steps and at the last step
into ``out/checkpoints/step-NNNNNN/`` (a temp folder, then renamed), and the manifest
``out/trajectory.json`` is rewritten atomically after each.

Determinism: the seed fixes LoRA initialisation, dropout and the data order (the example at
position k is ``perm_e[k mod n]`` with ``perm_e`` a permutation seeded by (seed, epoch e = k div n)),
and deterministic kernels are on while training. Resuming restores weights, optimizer, scheduler and
RNG states, and the step count (which fixes the data position), so a resumed run ends with weights
identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from safegeom.artifacts import check_output_dir
from safegeom.config import check
from safegeom.distributed import all_or_none, alone, broadcast, is_main, main_only, world_size
from safegeom.errors import ArtifactError, ConfigError
from safegeom.models import LoadConfig, load_model
from safegeom.models.checkpoint import check_device
from safegeom.train.adaptive import RiskCritic
from safegeom.train.checkpoints import (
    check_finite_weights,
    load_trainer_state,
    resumable,
    save_checkpoint,
)
from safegeom.train.config import DEFAULT_LR, RunConfig, TrainConfig
from safegeom.train.data import ExampleOrder, encode_examples
from safegeom.train.defences import DEFENCE_DIR, METHODS, prepare_defence, update_of
from safegeom.train.fsdp import shard_optimizer_state, shard_trainable, use_fsdp
from safegeom.train.guard import GuardConfig
from safegeom.train.optim import make_optimizer, optimizer_step
from safegeom.train.parallel import (
    broadcast_parameters,
    check_global_batch,
    check_resume_world,
    has_dropout,
    sum_values,
)
from safegeom.train.posthoc import PosthocConfig
from safegeom.train.regularised import RegConfig
from safegeom.train.step import StepLoss
from safegeom.train.tasks import Task, get_task
from safegeom.train.trajectory import TRAINER_STATE, Trajectory, load_trajectory, prepare_run_dir
from safegeom.train.wrap import Trainable, base_spec, default_lora_targets, wrap_model

__all__ = [
    "DEFAULT_LR",
    "METHODS",
    "TrainConfig",
    "default_lora_targets",
    "optimizer_step",
    "train",
    "wrap_settings",
]

Method = Literal["sft", "lora", "refusalguard", "adaptive", "kl", "safe-lora", "lox"]


def _check_resume(previous: Trajectory, config: RunConfig, base: str) -> Trajectory:
    """Return the run to continue: ``previous``, its ``steps`` raised when ``config`` extends it.

    Raises:
        ConfigError: a setting differs from the run's, or ``steps`` is below the saved steps.
    """
    now = config.to_dict()
    diffs = [
        f"{k} {previous.config.get(k)!r} (run) vs {v!r} (now)"
        for k, v in now.items()
        if previous.config.get(k) != v and k != "steps"
    ]
    if previous.base_model != base:
        diffs.insert(0, f"model {previous.base_model!r} (run) vs {base!r} (now)")
    if diffs:
        raise ConfigError(
            f"cannot resume {previous.root} with different settings: {'; '.join(diffs)}; pass "
            "the run's settings or --overwrite"
        )
    done = previous.last.step
    check(
        config.steps >= done, "steps",
        f"must be at least {done} to resume {previous.root} (it has {done} steps done)",
        config.steps,
    )  # fmt: skip
    if config.steps == previous.config.get("steps"):
        return previous
    return dataclasses.replace(
        previous, config={**previous.config, "steps": config.steps},
        complete=config.steps == done,
    )  # fmt: skip


def train(
    model_spec: str | Path,
    task: str | Path | Task,
    config: TrainConfig | None = None,
    *,
    method: Method = "lora",
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    load: LoadConfig | None = None,
    guard: GuardConfig | None = None,
    regulariser: RegConfig | None = None,
    critic: RiskCritic | None = None,
    posthoc: PosthocConfig | None = None,
    dtype: str | None = None,
    accelerator: Accelerator | None = None,
    callback: Callable[[int, float], None] | None = None,
    **fields: Any,
) -> Trajectory:
    """Fine-tune ``model_spec`` on ``task`` and save a checkpoint trajectory in ``out``.

    Args:
        model_spec: ``tiny-chat``, a checkpoint or adapter folder (merged first), or a hub id.
        task: A task spec (see :mod:`safegeom.train.tasks`) or a :class:`Task`.
        config: The :class:`TrainConfig` (steps, lr, batch size, schedule, LoRA settings ...).
        method: ``lora`` (adapters on ``lora_targets``), ``sft`` (all weights), ``refusalguard``
            (METHODS §6: the cone-projected edit, or LoRA, with the geometry penalty; see
            ``guard``), ``adaptive`` (§7: LoRA with risk-weighted KL to the reference) or ``kl``
            (LoRA with constant-weight KL).
        out: Run folder, checked before any work; refused if it holds a run, unless ``resume`` or
            ``overwrite``.
        resume: Continue the run in ``out`` from its last readable checkpoint (a fresh start if
            none); a larger ``steps`` extends a finished run.
        overwrite: Replace the run in ``out``.
        load: How to load the model (device, trust-remote-code, allow-pickle ...).
        guard: RefusalGuard's settings (:class:`GuardConfig`; refusalguard only).
        regulariser: The kl and adaptive settings (:class:`RegConfig`).
        critic: adaptive: a :class:`~safegeom.train.adaptive.RiskCritic` to use instead of the
            one ``regulariser`` names (e.g. ``JudgeCritic(my_judge)``).
        posthoc: safe-lora and lox: :class:`~safegeom.train.posthoc.PosthocConfig` (the
            unaligned base and the transform's settings).
        dtype: Training dtype of the weights (default: ``load.dtype``, else float32).
        accelerator: An ``Accelerator`` to use (default: ``Accelerator()``).
        callback: Called as ``callback(step, loss)`` after every optimizer step.
        **fields: :class:`TrainConfig` fields, replacing those of ``config`` (``steps=6``, ...).

    Returns:
        The :class:`Trajectory` of the run, as written to ``out/trajectory.json``.

    Raises:
        TrainingDiverged: the loss or the weights became non-finite; the message names the step.
        SafegeomError: bad settings, an unusable ``out``, a task or model that cannot be loaded.

    Example:
        >>> traj = train("tiny-chat", "mix", method="refusalguard", out="runs/rg", steps=150)
        >>> traj.paths[-1]  # load_model(...) gives the base with the edit attached
    """
    if "lora_targets" in fields and fields["lora_targets"] is not None:
        fields["lora_targets"] = tuple(fields["lora_targets"])
    try:
        settings = dataclasses.replace(config or TrainConfig(), **fields)
    except TypeError as err:
        raise TypeError(f"train(): {err}; the settings are the fields of TrainConfig") from None
    guard, regulariser = guard or GuardConfig(), regulariser or RegConfig()
    update = update_of(method, guard)
    if update != "full" and (Path(str(model_spec)).expanduser() / "adapter_config.json").is_file():
        raise ConfigError(
            f"{model_spec} is a LoRA adapter; merge it first (load_model(..., merge_adapter=True) "
            "and save_pretrained) or fine-tune it with sft"
        )
    load = load or LoadConfig()
    if load.device_map is not None:
        raise ConfigError(
            "--device-map: training runs one whole model per process (DDP); drop --device-map"
        )
    the_task = get_task(task)
    if load.device is not None:
        check_device(load.device)
    if accelerator is None:
        # Under a launcher on a machine without GPUs, the gloo group needs a CPU accelerator.
        cpu = load.device is not None and load.device.startswith("cpu")
        accelerator = Accelerator(cpu=cpu or (world_size() > 1 and not torch.cuda.is_available()))
    acc = accelerator
    sharded = use_fsdp(acc, settings.fsdp, update, method)  # refuses DeepSpeed, FSDP for LoRA
    check_global_batch(settings.batch_size, acc.num_processes)
    main_only(check_output_dir)(out)  # rank 0 alone probes (and makes) the folder
    out_dir = Path(out)
    if load.device is not None and torch.device(load.device).type != acc.device.type:
        raise ConfigError(
            f"--device {load.device}: the accelerator runs on {acc.device}; choose the device "
            "with CUDA_VISIBLE_DEVICES or accelerate launch"
        )
    previous = _run_dir(out_dir, resume=resume, overwrite=overwrite)
    base = base_spec(model_spec)
    dtype = dtype or load.dtype or "float32"
    is_adapter = (Path(str(model_spec)).expanduser() / "adapter_config.json").is_file()

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        set_seed(settings.seed)
        # Each rank loads (to CPU under FSDP: sharding moves it) and fits the defence itself.
        lm, defence = all_or_none(
            _setup, model_spec, load, dtype, "cpu" if sharded else str(acc.device), is_adapter,
            method, the_task,
            guard=guard, reg=regulariser, critic=critic, posthoc=posthoc, seed=settings.seed,
            folder=out_dir / DEFENCE_DIR, resume=previous is not None, write=acc.is_main_process,
        )  # fmt: skip
        wrap = wrap_settings(update, settings, guard, lm, sorted(defence.bases))
        lr = settings.lr
        config_run = RunConfig(
            method=method,
            task=the_task.name,
            task_size=len(the_task),
            task_hash=the_task.content_hash,
            seed=settings.seed,
            lr=float(lr if lr is not None else DEFAULT_LR[update]),
            batch_size=settings.batch_size,
            steps=settings.steps,
            save_every=settings.save_every,
            schedule=settings.schedule,
            warmup_steps=settings.warmup_steps,
            weight_decay=settings.weight_decay,
            grad_clip=settings.grad_clip,
            max_length=settings.max_length or lm.max_positions,
            system=settings.system,
            defence=defence.record,
            **(wrap if update == "lora" else {}),
        )
        if previous is not None:
            previous = _check_resume(previous, config_run, base)
            if previous.complete:
                return previous
            previous = resumable(previous)
        base_hash = previous.base_hash if previous is not None else lm.weight_hash
        resume_from = out_dir / previous.last.path if previous is not None else None
        trainable, examples = all_or_none(
            _trainable, lm, model_spec, update, wrap, dtype, resume_from, defence, the_task,
            settings.system, config_run.max_length,
        )  # fmt: skip
        if sharded:
            shard_trainable(trainable, acc)  # FSDP: each rank keeps 1/N of every weight
        pad = lm.tokenizer.pad_token_id
        step_loss = StepLoss(trainable, examples, int(pad if pad is not None else 0),
                             defence.penalty, seed=settings.seed, risks=defence.risks,
                             **defence.step_options)  # fmt: skip
        return _loop(acc, trainable, step_loss, len(examples), config_run, out_dir, base,
                     base_hash, previous, settings.progress, callback)  # fmt: skip
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _run_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> Trajectory | None:
    """:func:`prepare_run_dir` on rank 0 (which alone deletes), then the run to resume on every
    rank (read back from the manifest rank 0 checked)."""
    prepared = main_only(prepare_run_dir)(out_dir, resume=resume, overwrite=overwrite)
    if not broadcast(prepared is not None):
        return None
    return all_or_none(lambda: prepared if is_main() else load_trajectory(out_dir))


def _setup(
    model_spec: str | Path, load: LoadConfig, dtype: str, device: str, is_adapter: bool,
    method: str, task: Task, **defence: Any,
) -> tuple[Any, Any]:  # fmt: skip
    """This rank's model and defence (``(lm, defence)``), computed as if it were alone."""
    with alone():
        lm = load_model(model_spec, load, dtype=dtype, device=device, merge_adapter=is_adapter)
        if lm.edit is not None:
            raise ConfigError(f"{model_spec} is a RefusalGuard checkpoint; train from its base")
        return lm, prepare_defence(method, lm, list(task.prompts), load=load, **defence)


def _trainable(
    lm: Any, model_spec: str | Path, update: Any, wrap: dict[str, Any], dtype: str,
    resume_from: Path | None, defence: Any, task: Task, system: str | None, max_length: int,
) -> tuple[Trainable, list[Any]]:  # fmt: skip
    """The wrapped model (restored from ``resume_from``) and the encoded training examples."""
    trainable = wrap_model(lm, model_spec, update, wrap, dtype=dtype, resume_from=resume_from,
                           bases=defence.bases, export=defence.export)  # fmt: skip
    examples = encode_examples(
        lm.tokenizer, task.prompts, task.responses, system=system,
        chat_template=lm.chat_template, max_length=max_length,
    )  # fmt: skip
    return trainable, examples


def wrap_settings(
    update: str, settings: TrainConfig, guard: GuardConfig, lm: Any, layers: list[int]
) -> dict[str, Any]:
    """What :func:`~safegeom.train.wrap.wrap_model` needs for ``update``: the LoRA settings
    (targets resolved against ``lm``), or the edit's ``layers``, rank, positions and seed."""
    if update == "lora":
        targets = settings.lora_targets or default_lora_targets(lm)
        return {"lora_r": settings.lora_r, "lora_alpha": float(settings.lora_alpha),
                "lora_dropout": settings.lora_dropout, "lora_targets": targets}  # fmt: skip
    if update == "reft":
        return {"layers": sorted(layers), "rank": guard.reft_rank, "first_k": guard.reft_first,
                "last_k": guard.reft_last, "seed": settings.seed,
                "edit_generated": guard.reft_generated}  # fmt: skip
    return {}


def _postfix(terms: dict[str, float]) -> dict[str, str]:
    return {k: f"{v:.4f}" for k, v in terms.items()}


def _loop(
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
    """Run the optimizer steps; return the trajectory written."""
    from transformers import __version__ as hf_version

    world, rank = acc.num_processes, acc.process_index
    params = trainable.parameters()
    broadcast_parameters(params, world)  # the same start on every rank, whatever the init
    raw_opt, scheduler = make_optimizer(params, config)
    # The module is not wrapped in DDP: each rank computes its share of the global batch's loss
    # and the gradients are summed over the ranks (safegeom.train.parallel says why).
    optimizer = acc.prepare_optimizer(raw_opt)
    order = ExampleOrder(n_examples, config.seed)

    def indices_at(step: int) -> list[int]:
        """The step's global batch (each rank computes on its slice of it)."""
        return [order.index(step * config.batch_size + i) for i in range(config.batch_size)]

    if previous is None:
        versions = {"torch": torch.__version__, "transformers": hf_version}
        traj = Trajectory(out_dir, base, base_hash, config.to_dict(), versions=versions)
        trainable.module.eval()

        def first_loss() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with torch.no_grad(), acc.autocast():
                return step_loss(indices_at(0), 0, part=(rank, world))

        first, first_terms = sum_values(*all_or_none(first_loss), world)
        traj = save_checkpoint(acc, trainable, optimizer, scheduler, traj, 0, float(first),
                               terms={k: float(v) for k, v in first_terms.items()})  # fmt: skip
        start = 0
    else:
        traj = previous
        start = traj.last.step
        opt_state, sched_state, meta = load_trainer_state(out_dir / traj.last.path / TRAINER_STATE)
        if int(meta["step"]) != start:
            raise ArtifactError(f"trainer state of {traj.last.path} is not at step {start}")
        check_resume_world(int(meta.get("num_processes", 1)), world,
                           has_dropout(trainable.model), str(out_dir))  # fmt: skip
        optimizer.load_state_dict(shard_optimizer_state(opt_state, optimizer))
        scheduler.load_state_dict(sched_state)
    log = [dict(r) for r in traj.log if int(r["step"]) <= start]

    bar = tqdm(total=config.steps, initial=start, desc=f"{config.method} {config.task}",
               disable=not progress or not acc.is_main_process)  # fmt: skip
    sums: dict[str, list[float]] = {}
    total, count = 0.0, 0
    try:
        for step in range(start, config.steps):
            loss, terms = optimizer_step(
                acc, trainable, step_loss, optimizer, scheduler, indices_at(step), step,
                grad_clip=config.grad_clip, lr=config.lr, saved=traj.last.step, seed=config.seed,
            )  # fmt: skip
            value, values = float(loss), {k: float(v) for k, v in terms.items()}
            total, count, done = total + value, count + 1, step + 1
            for key, v in values.items():
                sums.setdefault(key, []).append(v)
            log.append({"step": done, "loss": value, **values})
            bar.update(1)
            bar.set_postfix(_postfix({"loss": value, **values}), refresh=False)
            if done % config.save_every == 0 or done == config.steps:
                check_finite_weights(params, done, traj, config.lr)
                traj = dataclasses.replace(traj, log=tuple(log))
                means = {k: sum(v) / len(v) for k, v in sums.items()}  # over steps that have it
                traj = save_checkpoint(acc, trainable, optimizer, scheduler, traj, done,
                                       total / count, terms=means,
                                       complete=done == config.steps)  # fmt: skip
                total, count, sums = 0.0, 0, {}
            if callback is not None:  # an error on one rank stops every rank
                all_or_none(callback, done, value)
    finally:
        bar.close()
    trainable.module.eval()
    return traj
