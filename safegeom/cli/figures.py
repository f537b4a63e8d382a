"""``safegeom figures``: the six paper figures of one or several saved audits, as PNG and PDF.

Several audit folders are overlaid on the same axes, one colour per run, labelled by ``--labels``
(default: the folders' names). A figure none of the audits has rows for (figure 1 of a
``--no-generate`` audit) is skipped with a printed note; panels missing some metrics say so in
the figure. Files go through the artifact layer (atomic, ``--out`` checked before any work).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from safegeom.cli.json_output import emit_json
from safegeom.cli.options import add_config, config_from_args
from safegeom.config import check
from safegeom.errors import SafegeomError
from safegeom.figure_files import FORMATS, read_tables, write_figures
from safegeom.outputs import claim_folder

__all__ = ["FiguresCommand", "register", "run"]


@dataclass(frozen=True)
class FiguresCommand:
    """The options of ``safegeom figures``."""

    audits: tuple[str, ...] = field(metadata={"positional": True, "metavar": "AUDIT_DIR"})
    """Audit folders written by safegeom audit; several are overlaid, in the order given."""
    out: str = field(metadata={"metavar": "DIR"})
    """Output folder for the figures (checked before any work starts)."""
    overwrite: bool = False
    """Write into a --out folder that holds files safegeom did not write (they are kept)."""
    labels: tuple[str, ...] = ()
    """Run labels, one per audit folder, comma-separated (default: the folders' names)."""
    formats: tuple[str, ...] = ("png", "pdf")
    """Image formats, comma-separated: png, pdf, svg."""
    json: bool = False
    """Print what was written (and skipped) as JSON to stdout."""
    progress: bool = True
    """Show a progress bar (--no-progress hides it)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "audits", tuple(str(a) for a in self.audits))
        check(bool(self.audits), "audits", "needs at least one audit folder", self.audits)
        unknown = [f for f in self.formats if f not in FORMATS]
        check(not unknown, "formats", f"must be among {', '.join(FORMATS)}", self.formats)
        check(bool(self.formats), "formats", "needs at least one format", self.formats)
        if self.labels:
            check(
                len(self.labels) == len(self.audits),
                "labels",
                f"needs one label per audit folder ({len(self.audits)})",
                self.labels,
            )
            check(
                len(set(self.labels)) == len(self.labels), "labels", "must be distinct", self.labels
            )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``figures`` subcommand."""
    parser = subparsers.add_parser(
        "figures",
        help="paper figures of saved audits",
        description="Behaviour, drift heatmap, H/R coupling, cone angles, fixed-source causal "
        "effects against random controls and coordinate statistics vs step, from audit folders "
        "(several are overlaid, one colour per run); writes fig1..fig6 in each --formats into "
        "--out.",
    )
    add_config(parser, FiguresCommand, title="command")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``safegeom figures``; returns the exit status."""
    command = config_from_args(FiguresCommand, args)
    with claim_folder(
        command.out, command="figures", overwrite=command.overwrite, inputs=command.audits
    ) as out:
        tables = read_tables(command.audits, command.labels)
        written, skipped = write_figures(
            tables, out, formats=command.formats, progress=command.progress
        )
        if not written:
            raise SafegeomError(
                "the audits hold no rows any figure draws (" + "; ".join(skipped.values()) + ")"
            )
        if command.json:
            emit_json(
                {
                    "written": [str(p) for p in written],
                    "skipped": skipped,
                    "runs": dict(zip(tables, command.audits, strict=True)),
                }
            )
            return 0
        for name, why in skipped.items():
            print(f"skipped {name}: {why}")
        for path in written:
            print(f"wrote {path}")
        return 0
