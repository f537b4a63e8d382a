"""The fine-tuning loop of every method (sft, lora, refusalguard, adaptive, kl): a trajectory.

:func:`train` loads ``MODEL`` with :func:`safegeom.models.load_model`, tokenizes the task with
response-only labels (:mod:`safegeom.train.data`), and runs AdamW under ``accelerate``
(``Accelerator()``: one process by default, ``accelerate launch`` for more; each process takes its
own ``batch_size`` slice of every step's global batch). Checkpoints are saved at step 0, every
``save_every`` steps and at the last step into ``out/checkpoints/step-NNNNNN/`` (written to a temp
folder, then renamed), and the manifest ``out/trajectory.json`` is rewritten atomically after each.

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
from safegeom.train.guard import GuardConfig
from safegeom.train.optim import make_optimizer, optimizer_step
from safegeom.train.posthoc import PosthocConfig
from safegeom.train.regularised import RegConfig
from safegeom.train.step import StepLoss
from safegeom.train.tasks import Task, get_task
from safegeom.train.trajectory import TRAINER_STATE, Trajectory, prepare_run_dir
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
    out_dir = check_output_dir(out)
    the_task = get_task(task)
    if load.device is not None:
        check_device(load.device)
    if accelerator is None:
        accelerator = Accelerator(cpu=load.device is not None and load.device.startswith("cpu"))
    acc = accelerator
    if load.device is not None and torch.device(load.device).type != acc.device.type:
        raise ConfigError(
            f"--device {load.device}: the accelerator runs on {acc.device}; choose the device "
            "with CUDA_VISIBLE_DEVICES or accelerate launch"
        )
    previous = prepare_run_dir(out_dir, resume=resume, overwrite=overwrite)
    base = base_spec(model_spec)
    dtype = dtype or load.dtype or "float32"
    is_adapter = (Path(str(model_spec)).expanduser() / "adapter_config.json").is_file()

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        set_seed(settings.seed)
        lm = load_model(
            model_spec, load, dtype=dtype, device=str(acc.device), merge_adapter=is_adapter
        )
        if lm.edit is not None:
            raise ConfigError(f"{model_spec} is a RefusalGuard checkpoint; train from its base")
        defence = prepare_defence(
            method, lm, list(the_task.prompts), guard=guard, reg=regulariser, critic=critic,
            posthoc=posthoc, load=load, seed=settings.seed, folder=out_dir / DEFENCE_DIR, resume=previous is not None,
            write=acc.is_main_process,
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
        trainable = wrap_model(lm, model_spec, update, wrap, dtype=dtype, resume_from=resume_from,
                               bases=defence.bases, export=defence.export)  # fmt: skip
        examples = encode_examples(
            lm.tokenizer, the_task.prompts, the_task.responses, system=settings.system,
            chat_template=lm.chat_template, max_length=config_run.max_length,
        )  # fmt: skip
        pad = lm.tokenizer.pad_token_id
        step_loss = StepLoss(trainable, examples, int(pad if pad is not None else 0),
                             defence.penalty, seed=settings.seed, risks=defence.risks,
                             **defence.step_options)  # fmt: skip
        return _loop(acc, trainable, step_loss, len(examples), config_run, out_dir, base,
                     base_hash, previous, settings.progress, callback)  # fmt: skip
    finally:
        torch.use_deterministic_algorithms(deterministic)


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

    params = trainable.parameters()
    raw_opt, scheduler = make_optimizer(params, config)
    trainable.module, optimizer = acc.prepare(trainable.module, raw_opt)
    order = ExampleOrder(n_examples, config.seed)
    per_step = config.batch_size * acc.num_processes

    def indices_at(step: int) -> list[int]:
        start = step * per_step + acc.process_index * config.batch_size
        return [order.index(start + i) for i in range(config.batch_size)]

    def reduce(terms: dict[str, torch.Tensor]) -> dict[str, float]:
        return {k: float(acc.reduce(v, reduction="mean")) for k, v in terms.items()}

    if previous is None:
        versions = {"torch": torch.__version__, "transformers": hf_version}
        traj = Trajectory(out_dir, base, base_hash, config.to_dict(), versions=versions)
        trainable.module.eval()
        with torch.no_grad():
            first, first_terms = step_loss(indices_at(0), 0)
        value0 = float(acc.reduce(first.detach(), reduction="mean"))
        traj = save_checkpoint(acc, trainable, optimizer, scheduler, traj, 0, value0,
                               terms=reduce(first_terms))  # fmt: skip
        start = 0
    else:
        traj = previous
        start = traj.last.step
        opt_state, sched_state, meta = load_trainer_state(out_dir / traj.last.path / TRAINER_STATE)
        if int(meta["step"]) != start:
            raise ArtifactError(f"trainer state of {traj.last.path} is not at step {start}")
        optimizer.load_state_dict(opt_state)
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
                grad_clip=config.grad_clip, lr=config.lr, saved=traj.last.step,
            )  # fmt: skip
            value, values = float(acc.reduce(loss.detach(), reduction="mean")), reduce(terms)
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
            if callback is not None:
                callback(done, value)
    finally:
        bar.close()
    trainable.module.eval()
    return traj
