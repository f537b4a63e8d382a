"""``safegeom train METHOD``: fine-tune a model on a task and save a checkpoint trajectory.

The options are derived from :class:`TrainCommand` (what to train and where), :class:`TrainConfig`
(how), :class:`~safegeom.models.LoadConfig` (how to load the model) and the methods' own configs:
:class:`~safegeom.train.guard.GuardConfig` (refusalguard),
:class:`~safegeom.train.regularised.RegConfig` (kl, adaptive) and
:class:`~safegeom.train.posthoc.PosthocConfig` (safe-lora, lox), each in a ``--help`` group whose
title names the methods that use it (:data:`METHOD_GROUPS`). A method's flag given with another
method is refused before any work (a flag counts as given when its value differs from its
default). Ctrl-C stops the run with its checkpoints consistent and says how to continue.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from safegeom.artifacts import check_output_dir
from safegeom.cli.common import emit_json
from safegeom.cli.options import add_config, config_from_args, option_dest
from safegeom.config import flag
from safegeom.distributed import is_main, main_only
from safegeom.errors import ConfigError
from safegeom.models.loading import LoadConfig
from safegeom.models.positions import LAYER_HELP
from safegeom.train.config import TrainConfig
from safegeom.train.guard import GuardConfig
from safegeom.train.posthoc import PosthocConfig
from safegeom.train.regularised import RegConfig
from safegeom.train.runner import train
from safegeom.train.tasks import get_task

__all__ = [
    "INTERRUPT_HINT",
    "METHOD_GROUPS",
    "MethodGroup",
    "TrainCommand",
    "check_method_flags",
    "register",
    "run",
]

INTERRUPT_HINT = "interrupted; rerun with --resume to continue from the last checkpoint"
"""What the command prints on Ctrl-C (the checkpoints and manifest stay consistent)."""

DESCRIPTION = """\
Fine-tune MODEL on a task (loss on response tokens only) under accelerate; saves
DIR/checkpoints/step-NNNNNN/ every --save-every steps (step 0 included), each loadable as a
MODEL, and the manifest DIR/trajectory.json (the method's settings in config["defence"]).

methods:
  sft           all weights
  lora          LoRA adapters on --lora-targets
  refusalguard  METHODS §6: the cone-projected edit (--variant reft) or LoRA (--variant lora),
                with the geometry penalty --lambda-geom on the refusal cones
  adaptive      METHODS §7: LoRA with a risk-weighted KL to the reference (--critic probe|judge)
  kl            LoRA with a constant-weight KL to the reference (--kl-weight)
  safe-lora     METHODS §8: LoRA, each checkpoint projected by Safe LoRA; needs --unaligned-base
  lox           METHODS §8: LoRA, each checkpoint extrapolated by LoX; needs --unaligned-base
"""


@dataclass(frozen=True)
class TrainCommand:
    """What to train, on what, and where the run goes."""

    method: Literal["sft", "lora", "refusalguard", "adaptive", "kl", "safe-lora", "lox"] = field(
        metadata={"positional": True, "metavar": "METHOD"}
    )
    """sft, lora, refusalguard, adaptive, kl, safe-lora or lox (one line each above)."""
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


@dataclass(frozen=True)
class MethodGroup:
    """A method config on the command line: its ``--help`` group and the methods using its flags."""

    cls: type
    """The frozen config dataclass."""
    title: str
    """Group title in ``--help`` (the methods are added in brackets)."""
    methods: tuple[str, ...]
    """The methods that take this config."""
    only: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Fields used by fewer methods than ``methods``: field name → those methods."""
    rest: tuple[str, ...] | None = None
    """The methods of the fields not in ``only`` (default: ``methods``)."""

    def methods_of(self, name: str) -> tuple[str, ...]:
        """The methods that use field ``name``."""
        return self.only.get(name, self.rest or self.methods)

    @property
    def heading(self) -> str:
        """The ``--help`` title: ``"refusalguard (refusalguard only)"``, ``"x (kl, adaptive)"``."""
        which = f"{self.methods[0]} only" if len(self.methods) == 1 else ", ".join(self.methods)
        return f"{self.title} ({which})"


METHOD_GROUPS = (
    MethodGroup(GuardConfig, "refusalguard", ("refusalguard",)),
    MethodGroup(
        RegConfig,
        "regularisation",
        ("kl", "adaptive"),
        only={"kl_weight": ("kl",)},
        rest=("adaptive",),
    ),
    MethodGroup(PosthocConfig, "weight-space baselines", ("safe-lora", "lox")),
)
"""The method configs, in ``--help`` order, and which methods use each field."""


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _given(cls: type, args: argparse.Namespace) -> list[dataclasses.Field[Any]]:
    """The fields of ``cls`` whose parsed value differs from the default (given on the line)."""
    given = []
    for f in dataclasses.fields(cls):
        dest = option_dest(cls, f.name)
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if (value is not None) if f.metadata.get("repeat") else value != _default(f):
            given.append(f)
    return given


def check_method_flags(method: str, args: argparse.Namespace) -> None:
    """Refuse flags of :data:`METHOD_GROUPS` that ``method`` does not use.

    Raises:
        ConfigError: ``"--lambda-geom is for refusalguard; got method lora"`` (every such flag).
    """
    wrong = []
    for group in METHOD_GROUPS:
        for f in _given(group.cls, args):
            users = group.methods_of(f.name)
            if method not in users:
                wrong.append(f"{f.metadata.get('flag', flag(f.name))} is for {', '.join(users)}")
    if wrong:
        raise ConfigError(f"{'; '.join(wrong)}; got method {method}")


def _state_layer_syntax(parser: argparse.ArgumentParser, cls: type) -> None:
    """Append the layer-spec syntax to the help of ``cls``'s ``*layers`` options lacking it."""
    dests = {option_dest(cls, f.name) for f in dataclasses.fields(cls) if f.name.endswith("layers")}
    for action in parser._actions:
        if action.dest in dests and action.help and "2:6" not in action.help:
            text, sep, default = action.help.rpartition(" (default: ")
            text, default = (text, sep + default) if sep else (action.help, "")
            action.help = f"{text} Layer specs: {LAYER_HELP.replace('%', '%%')}.{default}"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand (every method of :data:`~safegeom.train.defences.METHODS`)."""
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a model (sft, lora, or a defence) and save a checkpoint trajectory",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config(parser, TrainCommand, title="train")
    add_config(parser, TrainConfig, title="training")
    for group in METHOD_GROUPS:
        add_config(parser, group.cls, title=group.heading)
        _state_layer_syntax(parser, group.cls)
    add_config(parser, LoadConfig, title="model loading")
    parser.set_defaults(func=run, interrupt_hint=INTERRUPT_HINT)


def run(args: argparse.Namespace) -> int:
    """Execute ``safegeom train``: check the flags, ``--out`` and the task, then train; returns 0."""
    command = config_from_args(TrainCommand, args)
    check_method_flags(command.method, args)
    config = config_from_args(TrainConfig, args)
    load = config_from_args(LoadConfig, args)
    guard = config_from_args(GuardConfig, args)
    regulariser = config_from_args(RegConfig, args)
    posthoc = config_from_args(PosthocConfig, args)
    if command.method in ("safe-lora", "lox") and posthoc.unaligned_base is None:
        raise ConfigError(
            f"{command.method} needs --unaligned-base: the unaligned model MODEL was aligned from "
            "(METHODS §8 transforms the update with W_aligned − W_unaligned)"
        )
    main_only(check_output_dir)(command.out)  # under a launcher rank 0 alone probes the folder
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
        guard=guard,
        regulariser=regulariser,
        posthoc=posthoc,
    )
    if not is_main():  # every rank holds rank 0's trajectory; rank 0 alone prints it
        return 0
    if command.json:
        emit_json(trajectory.to_dict())
    else:
        last = trajectory.last
        print(f"wrote {len(trajectory.checkpoints)} checkpoints to {trajectory.root} "
              f"(step {last.step}, loss {last.loss:.4f})")  # fmt: skip
    return 0
