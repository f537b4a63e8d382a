"""The ``safegeom`` command.

Each subcommand lives in its own module under :mod:`safegeom.cli` and exposes
``register(subparsers)`` (adds its parser and sets ``func``). Bad input exits with status 2 and a
one-line message; results go to ``--out`` files or, with ``--json``, to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "CliError", "main"]

COMMANDS = ("demo", "capture", "carriers", "evaluate", "sweep", "train", "audit", "figures")
"""Subcommand modules, in help order; missing ones are skipped."""


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="safegeom",
        description="Safety geometry of language models: carriers, coupling, causal sweeps, "
        "fine-tuning trajectories.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"safegeom.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"safegeom.cli.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``safegeom`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except (CliError, ValueError, FileNotFoundError, KeyError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"safegeom {args.command}: error: {message}", file=sys.stderr)
        return 2


def _quiet_libraries() -> None:
    """Keep the command's own progress bars and messages; silence library chatter."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


if __name__ == "__main__":
    raise SystemExit(main())
