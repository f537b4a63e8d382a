"""``safegeom train METHOD``: fine-tune a model on a task and save a checkpoint trajectory.

The options are derived from :class:`TrainCommand` (what to train and where), :class:`TrainConfig`
(how), :class:`~safegeom.models.LoadConfig` (how to load the model) and the methods' own configs,
all taken from :data:`~safegeom.training.methods.METHODS`: the choices of METHOD, one ``--help`` line
per method, and one option group per method config whose title names the methods that use it
(:func:`method_groups`). A method's flag given with another method is refused before any work (a
flag counts as given when its value differs from its default). Ctrl-C stops the run with its
checkpoints consistent and says how to continue.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from dataclasses import dataclass, field
from typing import Any

from safegeom.artifacts import check_output_dir
from safegeom.cli.json_output import emit_json
from safegeom.cli.options import add_config, config_from_args, option_dest
from safegeom.config import flag
from safegeom.errors import ConfigError
from safegeom.models.loading import LoadConfig
from safegeom.models.positions import LAYER_HELP
from safegeom.parallel.ranks import is_main, main_only
from safegeom.training.config import TrainConfig
from safegeom.training.methods import METHODS, get_method
from safegeom.training.runner import check_resumable, train
from safegeom.training.tasks import get_task

__all__ = [
    "INTERRUPT_HINT",
    "MethodGroup",
    "TrainCommand",
    "check_method_flags",
    "description",
    "method_groups",
    "register",
    "run",
]

INTERRUPT_HINT = "interrupted; rerun with --resume to continue from the last checkpoint"
"""What the command prints on Ctrl-C (the checkpoints and manifest stay consistent)."""

_INTRO = """\
Fine-tune MODEL on a task (loss on response tokens only) under accelerate; saves
DIR/checkpoints/step-NNNNNN/ every --save-every steps (step 0 included), each loadable as a
MODEL, and the manifest DIR/trajectory.json (the method's settings in config["defence"]).
"""


def description() -> str:
    """The ``--help`` description: what the command does, then one entry per registered method."""
    width = max(len(name) for name in METHODS) + 2
    lines = [_INTRO, "methods:"]
    for name, method in METHODS.items():
        lines.append(
            textwrap.fill(
                method.summary,
                width=98,
                initial_indent=f"  {name.ljust(width)}",
                subsequent_indent=" " * (width + 2),
            )
        )
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class TrainCommand:
    """What to train, on what, and where the run goes."""

    method: str = field(metadata={"positional": True, "metavar": "METHOD"})
    """The training method: one of the methods listed above."""
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
        """Refuse an unknown method, --resume together with --overwrite, and --resume into a
        folder that does not exist."""
        get_method(self.method)
        if self.resume and self.overwrite:
            raise ConfigError("pass either --resume or --overwrite, not both")
        if self.resume:  # before the run folder is claimed (and made)
            check_resumable(self.out)


@dataclass(frozen=True)
class MethodGroup:
    """A method config on the command line: its ``--help`` group and the methods using its flags."""

    cls: type
    """The frozen config dataclass."""
    title: str
    """Group title in ``--help`` (the methods are added in brackets)."""
    methods: tuple[str, ...]
    """The methods that take this config."""
    users: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Field name → the methods that read it (every field of the config is a key)."""

    def methods_of(self, name: str) -> tuple[str, ...]:
        """The methods that use field ``name``."""
        return self.users.get(name, self.methods)

    @property
    def heading(self) -> str:
        """The ``--help`` title: ``"refusalguard (refusalguard only)"``, ``"x (kl, adaptive)"``."""
        which = f"{self.methods[0]} only" if len(self.methods) == 1 else ", ".join(self.methods)
        return f"{self.title} ({which})"


def method_groups() -> tuple[MethodGroup, ...]:
    """The method configs of :data:`~safegeom.training.methods.METHODS`, in registry order, each
    with the methods that take it and, per field, those that read it."""
    groups: dict[type, MethodGroup] = {}
    for name, method in METHODS.items():
        if method.config is None:
            continue
        cls = method.config
        group = groups.get(cls) or MethodGroup(cls, method.group or cls.__name__, ())
        users = dict(group.users)
        for f in dataclasses.fields(cls):
            if method.uses is None or f.name in method.uses:
                users[f.name] = (*users.get(f.name, ()), name)
        groups[cls] = MethodGroup(cls, group.title, (*group.methods, name), users)
    return tuple(groups.values())


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
    """Refuse flags of the method configs (:func:`method_groups`) that ``method`` does not use.

    Raises:
        ConfigError: ``"--lambda-geom is for refusalguard; got method lora"`` (every such flag).
    """
    wrong = []
    for group in method_groups():
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
    """Add the ``train`` subcommand (every method of :data:`~safegeom.training.methods.METHODS`)."""
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a model (plainly or with a defence) and save a checkpoint trajectory",
        description=description(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config(parser, TrainCommand, title="train")
    add_config(parser, TrainConfig, title="training")
    for group in method_groups():
        add_config(parser, group.cls, title=group.heading)
        _state_layer_syntax(parser, group.cls)
    add_config(parser, LoadConfig, title="model loading")
    parser.set_defaults(func=run, interrupt_hint=INTERRUPT_HINT)


def run(args: argparse.Namespace) -> int:
    """Execute ``safegeom train``: check the flags, ``--out`` and the task, then train; returns 0."""
    command = config_from_args(TrainCommand, args)
    check_method_flags(command.method, args)
    method = METHODS[command.method]
    config = config_from_args(TrainConfig, args)
    load = config_from_args(LoadConfig, args)
    settings = None
    if method.config is not None:
        settings = config_from_args(method.config, args)
        if method.check is not None:
            method.check(settings, command.method)
    main_only(check_output_dir)(command.out)  # under a launcher rank 0 alone probes the folder
    task = get_task(
        command.task, prompt_field=command.prompt_field, response_field=command.response_field
    )
    trajectory = train(
        command.model,
        task,
        config,
        method=command.method,
        settings=settings,
        out=command.out,
        resume=command.resume,
        overwrite=command.overwrite,
        load=load,
    )
    if not is_main():  # every rank holds rank 0's trajectory; rank 0 alone prints it
        return 0
    if command.json:
        emit_json(trajectory.to_dict())
    else:
        last = trajectory.last
        print(
            f"wrote {len(trajectory.checkpoints)} checkpoints to {trajectory.root} "
            f"(step {last.step}, loss {last.loss:.4f})"
        )
    return 0
