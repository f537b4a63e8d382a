"""What a training method is: its settings, what it fits on the frozen model, its step loss.

A method (:class:`Method`) is registered under its name in
:data:`safegeom.training.methods.METHODS`. :func:`safegeom.training.train` asks it

1. what it updates (:attr:`Method.update`: ``full`` weights, ``lora`` adapters, or the ``reft``
   edit), before the model is loaded;
2. to :attr:`~Method.prepare` its state from the frozen model (:class:`Setup`): what it fits
   once per run (cone bases, risk scores, the unaligned base's weights), written under
   ``DIR/defence`` and read back on resume, and the record the manifest keeps
   (``config["defence"]``);
3. the state (:class:`Prepared`) to make the model trainable (:meth:`Prepared.wrap`, which also
   sets how a checkpoint is written) and, at every step, the loss of a batch with its named terms
   (:meth:`Prepared.loss` on :class:`StepInputs`).

A new method is one module that builds a :class:`Method` and one line in the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from safegeom.models.loading import LoadConfig, LoadedModel
from safegeom.training.config import RunConfig
from safegeom.training.data import IGNORE_INDEX, TrainBatch
from safegeom.training.trainable import Export, Trainable, Update, wrap_model

__all__ = ["Method", "Prepared", "Setup", "StepInputs", "Terms", "fixed", "task_loss"]

Terms = dict[str, Tensor]
"""A step's named loss terms (detached scalars), logged with every checkpoint."""


@dataclass(frozen=True)
class Setup:
    """What a method's preparation sees: the frozen model, the task and the run's folder."""

    method: str
    """The name the method is registered under (what its record names)."""
    lm: LoadedModel
    """The model as loaded, before any update (the aligned reference)."""
    prompts: tuple[str, ...]
    """The training prompts."""
    seed: int
    """The run's seed."""
    folder: Path
    """``DIR/defence``: where the method keeps what it fitted (written only when ``write``)."""
    resume: bool
    """The run continues: read back what an earlier start wrote in ``folder``."""
    write: bool
    """This process writes ``folder`` (the main process)."""
    load: LoadConfig | None = None
    """How the run loads models (for a second model, e.g. an unaligned base)."""
    kinds: tuple[str | None, ...] | None = None
    """Each training example's class as the task marks it (:attr:`~safegeom.training.tasks.Task.kinds`: ``"harmful"``,
    ``"harmless"``, ``None``), aligned with ``prompts``; ``None`` when the task marks none."""


@dataclass(frozen=True)
class StepInputs:
    """One rank's share of a step, after the forward of the trained model."""

    trainable: Trainable
    """The model being trained."""
    batch: TrainBatch
    """This rank's rows of the step's batch, collated on the model's device."""
    logits: Tensor
    """The trained model's logits on ``batch`` (``[rows, seq, vocab]``)."""
    indices: Sequence[int]
    """The step's whole (global) batch: indices of training examples."""
    mine: Sequence[int]
    """This rank's slice of ``indices`` (the rows of ``batch``)."""
    step: int
    """The step (0-based)."""
    world: int
    """Number of ranks sharing the step: every mean is over the whole batch, so the ranks'
    shares add up to the loss of one process."""
    answer_tokens: Sequence[int]
    """Answer tokens of every training example (the labels after the causal shift)."""
    pad_id: int
    """The padding token id."""
    rank: int = 0
    """This rank's index among the ``world`` ranks (0 in one process)."""


def task_loss(inputs: StepInputs) -> tuple[Tensor, Terms]:
    """The LM loss on answer tokens: summed over this rank's rows, over the whole batch's answer
    tokens (the mean per answer token, in nats, in one process).

    Returns:
        ``(loss, {"task": loss detached})``.
    """
    logits, labels = inputs.logits, inputs.batch.labels
    target = labels[:, 1:].to(logits.device)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        target.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    total = sum(inputs.answer_tokens[i] for i in inputs.indices)
    loss = nll / max(total, 1)
    return loss, {"task": loss.detach()}


class Prepared:
    """A method's state for one run: plain fine-tuning of what ``update`` names.

    Methods subclass it to add a penalty or a reference to :meth:`loss`, or another trainable
    form to :meth:`wrap`.
    """

    def __init__(
        self, update: Update, record: dict[str, Any] | None = None, export: Export | None = None
    ) -> None:
        self.update = update
        """What is trained: ``full``, ``lora`` or ``reft``."""
        self.record = record
        """``config["defence"]`` of the manifest: the settings and what was fitted (``None`` for
        plain fine-tuning); compared on resume."""
        self.export = export
        """``lora`` only: the checkpoint transform (Safe LoRA, LoX; see
        :class:`~safegeom.training.trainable.Trainable`)."""

    def wrap(
        self,
        lm: LoadedModel,
        spec: str | Path,
        run: RunConfig,
        *,
        dtype: str,
        resume_from: Path | None,
    ) -> Trainable:
        """Make ``lm`` trainable (restored from ``resume_from`` when resuming).

        Returns:
            The :class:`~safegeom.training.trainable.Trainable` whose checkpoints ``load_model`` reads.
        """
        settings = run.lora_settings()
        return wrap_model(
            lm,
            spec,
            self.update,
            settings,
            dtype=dtype,
            resume_from=resume_from,
            export=self.export,
        )

    def loss(self, inputs: StepInputs) -> tuple[Tensor, Terms]:
        """The loss of this rank's share of a step and its named terms (:func:`task_loss`)."""
        return task_loss(inputs)


def fixed(update: Update) -> Callable[[Any], Update]:
    """The :attr:`Method.update` of a method that always trains ``update``."""
    return lambda settings: update


@dataclass(frozen=True)
class Method:
    """A training method as :func:`~safegeom.training.train` and ``safegeom train`` use it."""

    summary: str
    """One line for ``safegeom train --help`` (what it trains and how it defends)."""
    update: Callable[[Any], Update]
    """What the method trains, from its settings (``full``, ``lora`` or ``reft``)."""
    prepare: Callable[[Setup, Any], Prepared]
    """``prepare(setup, settings)``: the state of a run, fitted on the frozen model."""
    config: type | None = None
    """The frozen dataclass of its settings, which :func:`~safegeom.training.train` takes as
    ``settings=`` and ``safegeom train`` derives flags from (``None``: it has none)."""
    group: str | None = None
    """Title of its settings' ``--help`` group (methods sharing a config share the group)."""
    uses: tuple[str, ...] | None = None
    """The fields of ``config`` it reads (``None``: all); a flag of another field is refused."""
    check: Callable[[Any, str], None] | None = None
    """``check(settings, name)``: checks of its settings made before any work (raises
    ``ConfigError``)."""
