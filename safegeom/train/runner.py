"""The fine-tuning loop: full SFT or LoRA, producing a checkpoint trajectory.

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
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from safegeom.models import TINY_CHAT, LoadedModel, load_model, weight_hash
from safegeom.models.layout import resolve
from safegeom.train.data import Example, ExampleOrder, collate_right, encode_examples
from safegeom.train.tasks import Task, get_task
from safegeom.train.trajectory import (
    TRAINER_STATE,
    CheckpointRecord,
    Trajectory,
    checkpoint_dirname,
    load_trainer_state,
    prepare_run_dir,
    save_trainer_state,
    write_trajectory,
)

__all__ = ["DEFAULT_LR", "TrainConfig", "default_lora_targets", "train"]

Method = Literal["sft", "lora"]
DEFAULT_LR: dict[str, float] = {"sft": 1e-4, "lora": 1e-3}
"""Default peak learning rate per method."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one run; recorded in the manifest and checked on resume."""

    method: str
    """``sft`` (all weights) or ``lora``."""
    task: str
    """The task spec (``harmful``, ``arith:500``, a file ...)."""
    task_size: int
    """Number of training examples."""
    task_hash: str
    """sha256 of the task's prompts and responses."""
    seed: int
    """Seed of initialisation, dropout and data order."""
    lr: float
    """Peak AdamW learning rate."""
    batch_size: int
    """Examples per step and process."""
    steps: int
    """Optimizer steps."""
    save_every: int
    """Checkpoint interval in steps (step 0 and the last step are always saved)."""
    schedule: str = "cosine"
    """``cosine`` (to 0) or ``constant``, after ``warmup_steps`` of linear warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay on weight matrices."""
    grad_clip: float | None = 1.0
    """Global gradient-norm clip, or ``None``."""
    max_length: int | None = None
    """Truncate conversations to this many tokens (default: the model's context)."""
    system: str | None = None
    """System prompt rendered into every conversation."""
    lora_r: int | None = None
    """LoRA rank (LoRA only)."""
    lora_alpha: float | None = None
    """LoRA scaling numerator (LoRA only)."""
    lora_dropout: float | None = None
    """LoRA dropout (LoRA only)."""
    lora_targets: tuple[str, ...] | None = None
    """Module names LoRA adapts (LoRA only; default: every attention and MLP projection)."""

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form (tuples as lists)."""
        out = dataclasses.asdict(self)
        out["lora_targets"] = list(self.lora_targets) if self.lora_targets else None
        return out


def default_lora_targets(lm: LoadedModel) -> tuple[str, ...]:
    """Return the names of every linear (or GPT-2 ``Conv1D``) projection inside a decoder block.

    For Llama: ``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj``.
    """
    block = resolve(lm.base, lm.layout.blocks)[0]
    names: list[str] = []
    for name, module in block.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, (torch.nn.Linear, Conv1D)) and leaf not in names:
            names.append(leaf)
    if not names:
        raise ValueError(f"no linear projections found in a {lm.model_type} block for LoRA")
    return tuple(names)


def _base_spec(spec: str | Path) -> str:
    """The MODEL spec as recorded: tiny-chat and hub ids as given, local folders made absolute."""
    text = str(spec)
    path = Path(text).expanduser()
    return text if text == TINY_CHAT or not path.is_dir() else str(path.resolve())


def _check_resume(previous: Trajectory, config: TrainConfig, base: str) -> None:
    now = config.to_dict()
    diffs = [
        f"{k} {previous.config.get(k)!r} (run) vs {v!r} (now)"
        for k, v in now.items()
        if previous.config.get(k) != v
    ]
    if previous.base_model != base:
        diffs.insert(0, f"model {previous.base_model!r} (run) vs {base!r} (now)")
    if diffs:
        raise ValueError(
            f"cannot resume {previous.root} with different settings: {'; '.join(diffs)}; pass "
            "the run's settings or --overwrite"
        )


def _lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "constant":
            return 1.0
        t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return factor


def _wrap(
    lm: LoadedModel, spec: str | Path, config: TrainConfig, dtype: str, resume_from: Path | None
) -> tuple[LoadedModel, torch.nn.Module]:
    """Return the model to train: ``lm`` itself (SFT; reloaded from ``resume_from`` when resuming)
    or ``lm`` wrapped with LoRA adapters (their weights restored from ``resume_from``)."""
    device = str(lm.device)
    if config.method == "sft":
        if resume_from is not None:
            lm = load_model(resume_from, dtype=dtype, device=device)
        lm.model.requires_grad_(True)
        return lm, lm.model
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    lora = LoraConfig(
        r=config.lora_r or 8,
        lora_alpha=config.lora_alpha or 16,
        lora_dropout=config.lora_dropout or 0.0,
        target_modules=list(config.lora_targets or ()),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(lm.model, lora)
    model.peft_config["default"].base_model_name_or_path = _base_spec(spec)
    if resume_from is not None:
        weights = load_file(str(resume_from / "adapter_model.safetensors"), device=device)
        result = set_peft_model_state_dict(model, weights)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{resume_from} holds an adapter that does not fit this model")
    return lm, model


def train(
    model_spec: str | Path,
    task: str | Path | Task,
    *,
    method: Method = "lora",
    out: str | Path,
    steps: int = 100,
    save_every: int = 25,
    lr: float | None = None,
    batch_size: int = 8,
    seed: int = 0,
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    lora_targets: tuple[str, ...] | list[str] | None = None,
    schedule: Literal["cosine", "constant"] = "cosine",
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    max_length: int | None = None,
    system: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    dtype: str = "float32",
    accelerator: Accelerator | None = None,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> Trajectory:
    """Fine-tune ``model_spec`` on ``task`` and save a checkpoint trajectory in ``out``.

    Args:
        model_spec: ``tiny-chat``, a checkpoint or adapter folder (merged first), or a hub id.
        task: A task spec (see :mod:`safegeom.train.tasks`) or a :class:`Task`.
        method: ``lora`` (adapters on ``lora_targets``) or ``sft`` (all weights).
        out: Run folder; refused if it holds a run, unless ``resume`` or ``overwrite``.
        steps: Optimizer steps. save_every: checkpoint interval (step 0 and the last always).
        lr: Peak learning rate (default :data:`DEFAULT_LR` of the method).
        batch_size: Examples per step and process. seed: see the module docstring.
        lora_r, lora_alpha, lora_dropout, lora_targets: LoRA settings (targets default to
            :func:`default_lora_targets`).
        schedule, warmup_steps, weight_decay, grad_clip, max_length, system: see
            :class:`TrainConfig`.
        resume: Continue the run in ``out`` from its last checkpoint (a fresh start if none).
        overwrite: Replace the run in ``out``.
        dtype: Training dtype of the weights.
        accelerator: An ``Accelerator`` to use (default: ``Accelerator()``).
        progress: Show a tqdm bar with the loss.
        callback: Called as ``callback(step, loss)`` after every optimizer step.

    Returns:
        The :class:`Trajectory` of the run, as written to ``out/trajectory.json``.
    """
    if method not in ("sft", "lora"):
        raise ValueError(f"unknown method {method!r}; use sft or lora")
    if steps < 1 or save_every < 1 or batch_size < 1:
        raise ValueError("steps, save_every and batch_size must be at least 1")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}; use cosine or constant")
    if method == "lora" and (Path(str(model_spec)).expanduser() / "adapter_config.json").is_file():
        raise ValueError(
            f"{model_spec} is a LoRA adapter; merge it first (load_model(..., merge_adapter=True) "
            "and save_pretrained) or fine-tune it with sft"
        )
    the_task = get_task(task)
    out_dir = Path(out)
    previous = prepare_run_dir(out_dir, resume=resume, overwrite=overwrite)
    acc = accelerator or Accelerator()
    base = _base_spec(model_spec)

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        set_seed(seed)
        lm = load_model(model_spec, dtype=dtype, device=str(acc.device), merge_adapter=True)
        lora: dict[str, Any] = {}
        if method == "lora":
            targets = tuple(lora_targets) if lora_targets else default_lora_targets(lm)
            lora = {"lora_r": lora_r, "lora_alpha": float(lora_alpha)}
            lora |= {"lora_dropout": lora_dropout, "lora_targets": targets}
        context = getattr(lm.base.config, "max_position_embeddings", None)
        config = TrainConfig(
            method=method,
            task=the_task.name,
            task_size=len(the_task),
            task_hash=the_task.content_hash,
            seed=seed,
            lr=float(lr if lr is not None else DEFAULT_LR[method]),
            batch_size=batch_size,
            steps=steps,
            save_every=save_every,
            schedule=schedule,
            warmup_steps=warmup_steps,
            weight_decay=weight_decay,
            grad_clip=grad_clip,
            max_length=max_length or context,
            system=system,
            **lora,
        )
        if previous is not None:
            _check_resume(previous, config, base)
            if previous.complete:
                return previous
        base_hash = previous.base_hash if previous is not None else lm.weight_hash
        resume_from = out_dir / previous.last.path if previous is not None else None
        lm, model = _wrap(lm, model_spec, config, dtype, resume_from)
        examples = encode_examples(
            lm.tokenizer, the_task.prompts, the_task.responses, system=system,
            chat_template=lm.chat_template, max_length=config.max_length,
        )  # fmt: skip
        return _loop(acc, lm, model, examples, config, out_dir, base, base_hash, previous,
                     progress, callback)  # fmt: skip
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _loop(
    acc: Accelerator,
    lm: LoadedModel,
    model: torch.nn.Module,
    examples: list[Example],
    config: TrainConfig,
    out_dir: Path,
    base: str,
    base_hash: str,
    previous: Trajectory | None,
    progress: bool,
    callback: Callable[[int, float], None] | None,
) -> Trajectory:
    """Run the optimizer steps; return the trajectory written."""
    from transformers import __version__ as hf_version

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    raw_opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(raw_opt, _lr_lambda(config))
    model, optimizer = acc.prepare(model, raw_opt)
    order = ExampleOrder(len(examples), config.seed)
    per_step = config.batch_size * acc.num_processes
    pad_id = lm.tokenizer.pad_token_id

    def batch_at(step: int):
        start = step * per_step + acc.process_index * config.batch_size
        chosen = [examples[order.index(start + i)] for i in range(config.batch_size)]
        return collate_right(chosen, pad_id).to(acc.device)

    def forward(batch) -> torch.Tensor:
        return model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        ).loss

    if previous is None:
        versions = {"torch": torch.__version__, "transformers": hf_version}
        traj = Trajectory(out_dir, base, base_hash, config.to_dict(), versions=versions)
        model.eval()
        with torch.no_grad():
            first = acc.reduce(forward(batch_at(0)).detach(), reduction="mean")
        traj = _save(acc, lm, model, optimizer, scheduler, traj, 0, float(first))
        start = 0
    else:
        traj = previous
        start = traj.last.step
        opt_state, sched_state, meta = load_trainer_state(out_dir / traj.last.path / TRAINER_STATE)
        if int(meta["step"]) != start:
            raise ValueError(f"trainer state of {traj.last.path} is not at step {start}")
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(sched_state)

    bar = tqdm(total=config.steps, initial=start, desc=f"{config.method} {config.task}",
               disable=not progress or not acc.is_main_process)  # fmt: skip
    total, count = 0.0, 0
    try:
        for step in range(start, config.steps):
            model.train()
            loss = forward(batch_at(step))
            acc.backward(loss)
            if config.grad_clip:
                acc.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(acc.reduce(loss.detach(), reduction="mean"))
            total, count, done = total + value, count + 1, step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            if done % config.save_every == 0 or done == config.steps:
                traj = _save(acc, lm, model, optimizer, scheduler, traj, done, total / count,
                             complete=done == config.steps)  # fmt: skip
                total, count = 0.0, 0
            if callback is not None:
                callback(done, value)
    finally:
        bar.close()
    model.eval()
    return traj


def _save(
    acc: Accelerator,
    lm: LoadedModel,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    traj: Trajectory,
    step: int,
    loss: float,
    *,
    complete: bool = False,
) -> Trajectory:
    """Save the checkpoint at ``step`` (temp folder + rename) and rewrite the manifest."""
    rel = checkpoint_dirname(step)
    per_step = int(traj.config["batch_size"]) * acc.num_processes
    record = CheckpointRecord(step=step, loss=loss, path=rel)
    acc.wait_for_everyone()
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        final = traj.root / rel
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        # LoRA never adapts embeddings; "auto" would look the base model up on the hub.
        peft = {"save_embedding_layers": False} if hasattr(unwrapped, "peft_config") else {}
        unwrapped.save_pretrained(tmp, **peft)
        lm.tokenizer.save_pretrained(tmp)
        save_trainer_state(
            tmp / TRAINER_STATE,
            optimizer_state=optimizer.state_dict(),
            scheduler_state=scheduler.state_dict(),
            extra={"step": step, "data_position": step * per_step},
        )
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        record = dataclasses.replace(record, weight_hash=weight_hash(unwrapped))
        traj = traj.with_checkpoint(record, complete=complete)
        write_trajectory(traj)
    else:
        traj = traj.with_checkpoint(record, complete=complete)
    acc.wait_for_everyone()
    return traj
