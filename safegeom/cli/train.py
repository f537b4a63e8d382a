"""``safegeom train sft|lora``: fine-tune a model on a task and save a checkpoint trajectory.

The options are derived from :class:`TrainCommand` (what to train and where), :class:`TrainConfig`
(how) and :class:`~safegeom.models.LoadConfig` (how to load the model). Ctrl-C stops the run with
its checkpoints consistent and says how to continue.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

from safegeom.artifacts import check_output_dir
from safegeom.cli.common import emit_json
from safegeom.cli.options import add_config, config_from_args
from safegeom.errors import ConfigError
from safegeom.models.loading import LoadConfig
from safegeom.train.config import TrainConfig
from safegeom.train.runner import train
from safegeom.train.tasks import get_task

__all__ = ["INTERRUPT_HINT", "TrainCommand", "register", "run"]

INTERRUPT_HINT = "interrupted; rerun with --resume to continue from the last checkpoint"
"""What the command prints on Ctrl-C (the checkpoints and manifest stay consistent)."""


@dataclass(frozen=True)
class TrainCommand:
    """What to train, on what, and where the run goes."""

    method: Literal["sft", "lora"] = field(metadata={"positional": True, "metavar": "METHOD"})
    """sft (all weights) or lora (adapters)."""
    model: str = field(metadata={"positional": True, "metavar": "MODEL"})
    """tiny-chat, a checkpoint or adapter folder, or a hub id."""
    task: str = field(metadata={"metavar": "SPEC"})
    """The task: harmful[:N], sentiment[:N], arith[:N], mix[:N] (harmful:sentiment 1:4), mix-arith[:N], or a .jsonl file of prompt/response objects."""
    out: str = field(metadata={"metavar": "DIR"})
    """Run folder (checkpoints and trajectory.json); checked before the model is loaded."""
    prompt_field: str = "prompt"
    """Prompt field of a JSONL task."""
    response_field: str = "response"
    """Response field of a JSONL task."""
    resume: bool = False
    """Continue the run in --out from its last good checkpoint (with a larger --steps: extend it)."""
    overwrite: bool = False
    """Replace the run in --out."""
    json: bool = False
    """Print the manifest as JSON."""

    def __post_init__(self) -> None:
        """Refuse --resume together with --overwrite."""
        if self.resume and self.overwrite:
            raise ConfigError("pass either --resume or --overwrite, not both")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand (methods ``sft`` and ``lora``)."""
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a model and save a checkpoint trajectory",
        description="Fine-tune MODEL on a task (loss on response tokens only) under accelerate; "
        "saves DIR/checkpoints/step-NNNNNN/ every --save-every steps (step 0 included), each "
        "loadable as a MODEL, and the manifest DIR/trajectory.json.",
    )
    add_config(parser, TrainCommand, title="train")
    add_config(parser, TrainConfig, title="training")
    add_config(parser, LoadConfig, title="model loading")
    parser.set_defaults(func=run, interrupt_hint=INTERRUPT_HINT)


def run(args: argparse.Namespace) -> int:
    """Execute ``safegeom train``: check ``--out`` and the task, then train; returns 0."""
    command = config_from_args(TrainCommand, args)
    config = config_from_args(TrainConfig, args)
    load = config_from_args(LoadConfig, args)
    check_output_dir(command.out)
    task = get_task(
        command.task, prompt_field=command.prompt_field, response_field=command.response_field
    )
    trajectory = train(
        command.model,
        task,
        config,
        method=command.method,
        out=command.out,
        resume=command.resume,
        overwrite=command.overwrite,
        load=load,
    )
    if command.json:
        emit_json(trajectory.to_dict())
    else:
        last = trajectory.last
        print(f"wrote {len(trajectory.checkpoints)} checkpoints to {trajectory.root} "
              f"(step {last.step}, loss {last.loss:.4f})")  # fmt: skip
    return 0
