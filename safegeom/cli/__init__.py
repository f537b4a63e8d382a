"""The ``safegeom`` command.

Each subcommand lives in its own module under :mod:`safegeom.cli` and exposes
``register(subparsers)`` (adds its parser, derived from config dataclasses by
:mod:`safegeom.cli.options`, and sets ``func``). Bad input, that is a
:class:`~safegeom.errors.SafegeomError`, exits with status 2 and a one-line message; any other
exception is a bug and keeps its traceback. Ctrl-C exits with status 130 and one line. Results go
to ``--out`` files or, with ``--json``, to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from safegeom.errors import SafegeomError

__all__ = ["COMMANDS", "CliError", "Parser", "build_parser", "main"]

COMMANDS = (
    "demo",
    "capture",
    "carriers",
    "evaluate",
    "sweep",
    "attack",
    "train",
    "audit",
    "figures",
)
"""Subcommand modules, in help order; each must import (a failure is an error, not a gap)."""


class CliError(SafegeomError):
    """A user-facing error raised by the command line itself: one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """The command's argument parser: usage errors are one line (and a pointer to ``--help``),
    and comma lists of negative numbers (``--strengths -2,-1,1``) are values, not options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\d*\.?\d+([eE][-+]?\d+)?(,[-+.\deE]*)*$")

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand registered."""
    parser = Parser(
        prog="safegeom",
        description="Safety geometry of language models: carriers, coupling, causal sweeps, "
        "fine-tuning trajectories.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"safegeom.cli.{name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``safegeom`` console script; returns the exit status."""
    from safegeom.parallel.dispatch import sharding
    from safegeom.parallel.ranks import close

    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:  # under a launcher the library's leaves run their sharded twins (safegeom.parallel)
        with sharding(), _claimed(args):
            return int(args.func(args) or 0)
    except SafegeomError as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"safegeom {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = getattr(args, "interrupt_hint", None) or "interrupted"
        print(f"safegeom {args.command}: {hint}", file=sys.stderr)
        return 130
    finally:
        close()  # under a launcher: tear the process group down before the interpreter exits


def _claimed(args: argparse.Namespace) -> contextlib.AbstractContextManager[Any]:
    """``train``'s run folder, claimed around the whole command (:mod:`safegeom.outputs`: the
    lock, the check that the folder is empty or safegeom's, the record of what the run writes).

    The other commands claim their ``--out`` themselves; a claim nested in this one is the same.
    """
    if args.command != "train":
        return contextlib.nullcontext()
    from safegeom.cli.options import config_from_args
    from safegeom.cli.train import TrainCommand
    from safegeom.outputs import claim_folder, inputs_of

    command = config_from_args(TrainCommand, args)
    return claim_folder(
        command.out, command="train", overwrite=command.overwrite, inputs=inputs_of(command)
    )


def _quiet_libraries() -> None:
    """Keep the command's own progress bars and messages; silence library chatter."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


if __name__ == "__main__":
    raise SystemExit(main())
