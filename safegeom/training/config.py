"""What a fine-tuning run is told (:class:`TrainConfig`) and what its manifest records.

:class:`TrainConfig` holds the settings a user chooses; ``safegeom train`` derives its options from
it and :func:`safegeom.training.train` takes it (``train(model, task, TrainConfig(steps=6), ...)``;
a method's own settings go in ``settings=``). :class:`RunConfig` wraps
it with what was resolved against the model, the task and the method (learning rate default, LoRA
targets, context length, task size and hash, the method's record); its :meth:`RunConfig.to_dict`
is the ``config`` recorded in ``trajectory.json``, compared on resume.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

from safegeom.config import check

__all__ = ["DEFAULT_LR", "RunConfig", "TrainConfig"]

DEFAULT_LR: dict[str, float] = {"full": 1e-4, "lora": 1e-3, "reft": 1e-2}
"""Default peak learning rate by what a method updates (its ``update``): all weights, LoRA
adapters, or a ReFT edit (RefusalGuard's)."""


@dataclass(frozen=True)
class TrainConfig:
    """How to fine-tune: steps, optimiser, schedule, LoRA settings (``safegeom train`` options)."""

    steps: int = 100
    """Optimizer steps (with --resume, a larger number extends a finished run)."""
    save_every: int = 25
    """Checkpoint interval in steps (step 0 and the last step are always saved)."""
    lr: float | None = None
    """Peak AdamW learning rate (default: 1e-4 for sft, 1e-2 for the refusalguard edit, 1e-3 else)."""
    batch_size: int = 8
    """Examples per step: the global batch, whatever the number of processes (under a launcher
    each of N processes takes ``batch_size / N`` of them; N must divide it)."""
    seed: int = 0
    """Seed of LoRA (or edit) initialisation, dropout, data order and calibration batches."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule after warm-up: cosine (to 0) or constant."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay on weight matrices."""
    grad_clip: float | None = 1.0
    """Global gradient-norm clip."""
    max_length: int | None = None
    """Truncate conversations to this many tokens (default: the model's context)."""
    system: str | None = None
    """System prompt rendered into every conversation."""
    lora_r: int = 8
    """LoRA rank (lora only)."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (lora only)."""
    lora_dropout: float = 0.0
    """LoRA dropout probability (lora only)."""
    lora_targets: tuple[str, ...] | None = None
    """Module names LoRA adapts (default: every attention and MLP projection of a block)."""
    fsdp: bool = False
    """sft only: shard every weight, its gradient and its AdamW moments over the processes of a
    launcher (FSDP2, one decoder block at a time) instead of holding the whole model on each;
    the same results and checkpoints as without (also on with an accelerate FSDP config)."""
    progress: bool = True
    """Show a progress bar with the loss."""

    def __post_init__(self) -> None:
        """Coerce ``lora_targets`` to a tuple and check every range.

        Raises:
            ConfigError: a value is out of range; the message names the field and its flag.
        """
        if self.lora_targets is not None:
            targets = (
                (self.lora_targets,) if isinstance(self.lora_targets, str) else self.lora_targets
            )
            object.__setattr__(self, "lora_targets", tuple(targets) or None)
        check(self.steps >= 1, "steps", "must be at least 1", self.steps)
        check(self.save_every >= 1, "save_every", "must be at least 1", self.save_every)
        check(self.batch_size >= 1, "batch_size", "must be at least 1", self.batch_size)
        if self.lr is not None:
            check(
                math.isfinite(self.lr) and self.lr > 0, "lr", "must be a positive number", self.lr
            )
        check(
            self.schedule in ("cosine", "constant"),
            "schedule",
            "must be cosine or constant",
            self.schedule,
        )
        check(self.warmup_steps >= 0, "warmup_steps", "must be 0 or more", self.warmup_steps)
        check(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            "weight_decay",
            "must be 0 or more",
            self.weight_decay,
        )
        if self.grad_clip is not None:
            check(
                math.isfinite(self.grad_clip) and self.grad_clip > 0,
                "grad_clip",
                "must be a positive number",
                self.grad_clip,
            )
        if self.max_length is not None:
            check(self.max_length >= 2, "max_length", "must be at least 2 tokens", self.max_length)
        check(self.lora_r >= 1, "lora_r", "must be at least 1", self.lora_r)
        check(
            math.isfinite(self.lora_alpha) and self.lora_alpha > 0,
            "lora_alpha",
            "must be a positive number",
            self.lora_alpha,
        )
        check(
            0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must lie in [0, 1)", self.lora_dropout
        )


@dataclass(frozen=True)
class RunConfig:
    """Settings of one run as its manifest records them; checked on resume.

    It holds the :class:`TrainConfig` as chosen and what was resolved against the model, the task
    and the method; :meth:`to_dict` is the manifest's flat ``config``.
    """

    method: str
    """The training method's registered name (see :data:`safegeom.training.methods.METHODS`)."""
    task: str
    """The task spec (``harmful``, ``arith:500``, a file ...)."""
    task_size: int
    """Number of training examples."""
    task_hash: str
    """sha256 of the task's prompts and responses."""
    train: TrainConfig
    """The settings as chosen (steps, batch size, schedule, LoRA settings ...)."""
    lr: float
    """Peak AdamW learning rate (``train.lr``, or the default of what the method updates)."""
    max_length: int | None
    """Truncate conversations to this many tokens (``train.max_length``, or the model's context)."""
    lora_targets: tuple[str, ...] | None = None
    """Module names LoRA adapts (resolved against the model); ``None`` when the run trains no
    LoRA adapters (then no ``lora_*`` setting is recorded)."""
    defence: dict[str, Any] | None = None
    """The method's settings and what it fitted on the frozen model (``None`` for sft, lora)."""

    def lora_settings(self) -> dict[str, Any]:
        """The LoRA settings of the run (``lora_r``, ``lora_alpha``, ``lora_dropout``,
        ``lora_targets``); empty when it trains no LoRA adapters."""
        if self.lora_targets is None:
            return {}
        return {
            "lora_r": self.train.lora_r,
            "lora_alpha": float(self.train.lora_alpha),
            "lora_dropout": self.train.lora_dropout,
            "lora_targets": self.lora_targets,
        }

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form the manifest records (flat; tuples as lists)."""
        t = self.train
        lora = self.lora_settings()
        targets = lora.get("lora_targets")
        return {
            "method": self.method,
            "task": self.task,
            "task_size": self.task_size,
            "task_hash": self.task_hash,
            "seed": t.seed,
            "lr": self.lr,
            "batch_size": t.batch_size,
            "steps": t.steps,
            "save_every": t.save_every,
            "schedule": t.schedule,
            "warmup_steps": t.warmup_steps,
            "weight_decay": t.weight_decay,
            "grad_clip": t.grad_clip,
            "max_length": self.max_length,
            "system": t.system,
            "lora_r": lora.get("lora_r"),
            "lora_alpha": lora.get("lora_alpha"),
            "lora_dropout": lora.get("lora_dropout"),
            "lora_targets": list(targets) if targets else None,
            "defence": copy.deepcopy(self.defence),
        }
