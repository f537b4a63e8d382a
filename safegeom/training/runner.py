"""Fine-tuning with any training method (:data:`~safegeom.training.methods.METHODS`): a trajectory.

:func:`train` loads ``MODEL`` with :func:`safegeom.models.load_model`, lets the method prepare
its state on the frozen model, tokenizes the task with response-only labels
(:mod:`safegeom.training.data`), and runs AdamW under ``accelerate``
(:func:`~safegeom.training.loop.run_steps`; one process by default; under ``accelerate
launch``/``torchrun`` N processes share each step's global batch of ``batch_size``, with one
process's results: :mod:`safegeom.parallel.ddp`, the weights sharded with ``fsdp``:
:mod:`safegeom.parallel.fsdp`; rank 0 alone writes). This runner and its loop are the training
side's entry points to the rank primitives; each call runs inside
:func:`~safegeom.parallel.dispatch.sharding`, so the library it calls shares its work out. Checkpoints are saved at step 0, every
``save_every`` steps and at the last step into ``out/checkpoints/step-NNNNNN/`` (a temp folder,
then renamed), and the manifest ``out/trajectory.json`` is rewritten atomically after each.

Determinism: the seed fixes LoRA initialisation, dropout and the data order (the example at
position k is ``perm_e[k mod n]`` with ``perm_e`` a permutation seeded by (seed, epoch e = k div
n)), and deterministic kernels are on while training. Resuming restores weights, optimizer,
scheduler and RNG states, and the step count (which fixes the data position), so a resumed run
ends with weights identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from safegeom.artifacts import check_output_dir
from safegeom.config import check
from safegeom.errors import ConfigError
from safegeom.models import LoadConfig, LoadedModel, load_model
from safegeom.models.checkpoint import check_device
from safegeom.models.merged import is_adapter_spec
from safegeom.outputs import claims_folder
from safegeom.parallel.ddp import check_global_batch
from safegeom.parallel.dispatch import shards
from safegeom.parallel.fsdp import shard_trainable, use_fsdp
from safegeom.parallel.ranks import all_or_none, alone, broadcast, is_main, main_only, world_size
from safegeom.training.checkpoints import resumable
from safegeom.training.config import DEFAULT_LR, RunConfig, TrainConfig
from safegeom.training.data import Example, encode_examples
from safegeom.training.loop import run_steps
from safegeom.training.methods import Method, Prepared, Setup, get_method
from safegeom.training.step import StepLoss
from safegeom.training.tasks import Task, get_task
from safegeom.training.trainable import Trainable, base_spec, default_lora_targets
from safegeom.training.trajectory import Trajectory, load_trajectory, prepare_run_dir

__all__ = ["DEFENCE_DIR", "method_settings", "run_config", "train"]

DEFENCE_DIR = "defence"
"""Sub-folder of a run holding what its method fitted on the frozen model."""


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
    done, steps = previous.last.step, config.train.steps
    message = f"must be at least {done} to resume {previous.root} (it has {done} steps done)"
    check(steps >= done, "steps", message, steps)
    if steps == previous.config.get("steps"):
        return previous
    return dataclasses.replace(
        previous, config={**previous.config, "steps": steps}, complete=steps == done
    )


def method_settings(name: str, settings: Any = None) -> tuple[Method, Any]:
    """The method registered as ``name`` and its settings: ``settings``, or its config's defaults.

    Raises:
        ConfigError: an unknown method; settings that are not the method's config (or settings
            for a method that takes none).
    """
    method = get_method(name)
    if method.config is None:
        if settings is not None:
            raise ConfigError(
                f"{name} takes no settings, got a {type(settings).__name__}; drop settings="
            )
        return method, None
    settings = method.config() if settings is None else settings
    if not isinstance(settings, method.config):
        raise ConfigError(
            f"settings= takes a {method.config.__name__} for {name}, got {type(settings).__name__}"
        )
    return method, settings


def check_resumable(out: str | Path) -> None:
    """Refuse ``--resume`` into a folder that does not exist: there is no run to continue.

    Raises:
        ConfigError: ``out`` does not exist.
    """
    if not Path(out).exists():
        raise ConfigError(
            f"--resume: {out} does not exist, so there is nothing to resume; check the path, or "
            "drop --resume to start a new run there"
        )


def _check_resume_target(arguments: dict[str, Any]) -> None:
    """Before the folder is claimed (which makes it): ``resume`` needs a run folder that exists."""
    if arguments.get("resume"):
        check_resumable(arguments["out"])


@shards  # under a launcher the library's leaves run their sharded twins (safegeom.parallel)
@claims_folder("train", inputs=("model_spec", "task"), precheck=_check_resume_target)
def train(
    model_spec: str | Path,
    task: str | Path | Task,
    config: TrainConfig = TrainConfig(),
    *,
    method: str = "lora",
    settings: Any = None,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    load: LoadConfig = LoadConfig(),
    accelerator: Accelerator | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> Trajectory:
    """Fine-tune ``model_spec`` on ``task`` and save a checkpoint trajectory in ``out``.

    Args:
        model_spec: ``tiny-chat``, a checkpoint or adapter folder (merged first), or a hub id.
        task: A task spec (see :mod:`safegeom.training.tasks`) or a :class:`Task`.
        config: How to train: the :class:`TrainConfig` (steps, lr, batch size, schedule, LoRA
            settings, seed, progress ...).
        method: A name of :data:`~safegeom.training.methods.METHODS`: ``lora`` (adapters on
            ``lora_targets``), ``sft`` (all weights), or a defence (``refusalguard``, ``kl``,
            ``adaptive``, ``safe-lora``, ``lox``, ``r2d2``; see their modules).
        settings: The method's own settings, an instance of its config
            (``METHODS[method].config``: :class:`~safegeom.training.methods.refusalguard.GuardConfig`
            for refusalguard, :class:`~safegeom.training.regularised.RegConfig` for kl and
            adaptive, :class:`~safegeom.training.posthoc.PosthocConfig` for safe-lora and lox);
            default: that config's defaults. ``None`` for a method without settings.
        out: Run folder, checked before any work; refused if it holds a run, unless ``resume`` or
            ``overwrite``.
        resume: Continue the run in ``out`` from its last readable checkpoint (a fresh start if
            none); a larger ``steps`` extends a finished run.
        overwrite: Replace the run in ``out``.
        load: How to load the model (:class:`~safegeom.models.LoadConfig`: device, dtype,
            trust-remote-code, allow-pickle ...); its ``dtype`` is the training dtype of the
            weights (default float32).
        accelerator: An ``Accelerator`` to use (default: ``Accelerator()``).
        callback: Called as ``callback(step, loss)`` after every optimizer step.

    Returns:
        The :class:`Trajectory` of the run, as written to ``out/trajectory.json``.

    Raises:
        TrainingDiverged: the loss or the weights became non-finite; the message names the step.
        SafegeomError: bad settings, an unusable ``out``, a task or model that cannot be loaded.

    Example:
        Two LoRA steps on tiny-chat (``method="refusalguard"`` trains the defence the same way):

        >>> import tempfile
        >>> out = tempfile.mkdtemp() + "/run"
        >>> config = TrainConfig(steps=2, progress=False)
        >>> traj = train("tiny-chat", "mix", config, method="lora", out=out)
        >>> [path.name for path in traj.paths]  # each loads with load_model(path)
        ['step-000000', 'step-000002']
    """
    if not isinstance(config, TrainConfig):
        raise ConfigError(
            f"config= takes a TrainConfig, got {type(config).__name__}; the method's own "
            "settings go in settings="
        )
    chosen, settings = method_settings(method, settings)
    update = chosen.update(settings)
    is_adapter = is_adapter_spec(model_spec)  # smol-chat too: it would load unmerged
    if update != "full" and is_adapter:
        raise ConfigError(
            f"{model_spec} is a LoRA adapter; merge it first (safegeom.models.merged.save_merged, "
            "or load_model(..., LoadConfig(merge_adapter=True)) and save_pretrained) "
            "or fine-tune it with sft"
        )
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
    # refuses DeepSpeed, and FSDP for what is not full weights
    sharded = use_fsdp(acc, config.fsdp, update, method)
    check_global_batch(config.batch_size, acc.num_processes)
    if resume:
        check_resumable(out)
    main_only(check_output_dir)(out)  # rank 0 alone probes (and makes) the folder
    out_dir = Path(out)
    if load.device is not None and torch.device(load.device).type != acc.device.type:
        raise ConfigError(
            f"--device {load.device}: the accelerator runs on {acc.device}; choose the device "
            "with CUDA_VISIBLE_DEVICES or accelerate launch"
        )
    previous = _run_dir(out_dir, resume=resume, overwrite=overwrite)
    base = base_spec(model_spec)
    dtype = load.dtype or "float32"

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        set_seed(config.seed)
        # Each rank loads (to CPU under FSDP: sharding moves it) and prepares the method itself.
        device = "cpu" if sharded else str(acc.device)
        model = _Model(model_spec, load, dtype, device, is_adapter)
        setup = dict(
            method=method,
            seed=config.seed,
            folder=out_dir / DEFENCE_DIR,
            resume=previous is not None,
            write=acc.is_main_process,
            load=load,
        )
        lm, state = all_or_none(_setup, model, chosen, the_task, setup, settings)
        run = run_config(method, the_task, config, state, lm)
        if previous is not None:
            previous = _check_resume(previous, run, base)
            if previous.complete:
                return previous
            previous = resumable(previous)
        base_hash = previous.base_hash if previous is not None else lm.weight_hash
        resume_from = out_dir / previous.last.path if previous is not None else None
        trainable, examples = all_or_none(
            _trainable, lm, model_spec, state, run, dtype, resume_from, the_task
        )
        if sharded:
            shard_trainable(trainable, acc)  # FSDP: each rank keeps 1/N of every weight
        pad = lm.tokenizer.pad_token_id
        step_loss = StepLoss(trainable, examples, int(pad if pad is not None else 0), state)
        return run_steps(
            acc,
            trainable,
            step_loss,
            len(examples),
            run,
            out_dir,
            base,
            base_hash,
            previous,
            config.progress,
            callback,
        )
    finally:
        torch.use_deterministic_algorithms(deterministic)


def run_config(
    method: str, task: Task, config: TrainConfig, state: Prepared, lm: LoadedModel
) -> RunConfig:
    """The run's settings as the manifest records them: ``config`` resolved against the model
    (context length, LoRA targets), the task and what the method trains (the default lr).

    Returns:
        The :class:`RunConfig` (its ``defence`` the method's record).
    """
    lr = config.lr if config.lr is not None else DEFAULT_LR[state.update]
    targets = None
    if state.update == "lora":
        targets = config.lora_targets or default_lora_targets(lm)
    return RunConfig(
        method=method,
        task=task.name,
        task_size=len(task),
        task_hash=task.content_hash,
        train=config,
        lr=float(lr),
        max_length=config.max_length or lm.max_positions,
        lora_targets=targets,
        defence=state.record,
    )


def _run_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> Trajectory | None:
    """:func:`prepare_run_dir` on rank 0 (which alone deletes), then the run to resume on every
    rank (read back from the manifest rank 0 checked)."""
    prepared = main_only(prepare_run_dir)(out_dir, resume=resume, overwrite=overwrite)
    if not broadcast(prepared is not None):
        return None
    return all_or_none(lambda: prepared if is_main() else load_trajectory(out_dir))


@dataclasses.dataclass(frozen=True)
class _Model:
    """How this run loads its model."""

    spec: str | Path
    """The MODEL spec."""
    load: LoadConfig
    """The load settings."""
    dtype: str
    """The training dtype."""
    device: str
    """Where the weights go (CPU under FSDP: sharding moves them)."""
    is_adapter: bool
    """MODEL is an adapter folder (merged into its base)."""


def _setup(
    model: _Model,
    method: Method,
    task: Task,
    setup: dict[str, Any],
    settings: Any,
) -> tuple[LoadedModel, Prepared]:
    """This rank's model and method state (``(lm, state)``), computed as if it were alone."""
    with alone():
        config = dataclasses.replace(
            model.load,
            dtype=model.dtype,
            device=model.device,
            merge_adapter=model.is_adapter or model.load.merge_adapter,
        )
        lm = load_model(model.spec, config)
        if lm.edit is not None:
            raise ConfigError(f"{model.spec} is a RefusalGuard checkpoint; train from its base")
        prompts = tuple(task.prompts)
        given = Setup(lm=lm, prompts=prompts, kinds=task.kinds, **setup)
        return lm, method.prepare(given, settings)


def _trainable(
    lm: LoadedModel,
    model_spec: str | Path,
    state: Prepared,
    run: RunConfig,
    dtype: str,
    resume_from: Path | None,
    task: Task,
) -> tuple[Trainable, list[Example]]:
    """The wrapped model (restored from ``resume_from``) and the encoded training examples."""
    trainable = state.wrap(lm, model_spec, run, dtype=dtype, resume_from=resume_from)
    examples = encode_examples(
        lm.tokenizer,
        task.prompts,
        task.responses,
        system=run.train.system,
        chat_template=lm.chat_template,
        max_length=run.max_length,
    )
    return trainable, examples
