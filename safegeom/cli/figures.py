"""``safegeom figures``: the six paper figures of one or several saved audits, as PNG and PDF.

Several audit folders are overlaid on the same axes, one colour per run, labelled by ``--labels``
(default: the folders' names). A figure none of the audits has rows for (figure 1 of a
``--no-generate`` audit) is skipped with a printed note; panels missing some metrics say so in
the figure. Files go through the artifact layer (atomic, ``--out`` checked before any work).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from safegeom.artifacts import atomic_write, check_output_dir, check_output_file
from safegeom.cli.common import emit_json
from safegeom.cli.options import add_config, config_from_args
from safegeom.config import check
from safegeom.errors import SafegeomError
from safegeom.plots import FIGURES, has_data, style

__all__ = [
    "FORMATS",
    "FiguresCommand",
    "figure_script",
    "read_table",
    "read_tables",
    "register",
    "run",
    "run_labels",
    "save_figure",
    "write_figures",
]

FORMATS = ("png", "pdf", "svg")
"""Image formats ``--formats`` accepts."""
DPI = 200
"""Resolution of raster formats (PNG), dots per inch."""


@dataclass(frozen=True)
class FiguresCommand:
    """The options of ``safegeom figures``."""

    audits: tuple[str, ...] = field(metadata={"positional": True, "metavar": "AUDIT_DIR"})
    """Audit folders written by safegeom audit; several are overlaid, in the order given."""
    out: str = field(metadata={"metavar": "DIR"})
    """Output folder for the figures (checked before any work starts)."""
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
            check(len(self.labels) == len(self.audits), "labels",
                  f"needs one label per audit folder ({len(self.audits)})", self.labels)  # fmt: skip
            check(len(set(self.labels)) == len(self.labels), "labels", "must be distinct",
                  self.labels)  # fmt: skip


def read_table(folder: str | Path) -> pd.DataFrame:
    """The tidy table of the audit saved in ``folder``.

    Raises:
        NotFoundError: no such folder. ArtifactError: it holds no finished audit.
    """
    from safegeom.audit.result import load_audit

    return load_audit(folder).table


def run_labels(folders: Sequence[str | Path]) -> tuple[str, ...]:
    """Default run labels: each folder's name, with its parent's where two names clash.

    Returns:
        One distinct label per folder, in order.
    """
    paths = [Path(f).resolve() for f in folders]
    labels = [p.name for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{p.parent.name}/{p.name}" for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{label} ({i + 1})" for i, label in enumerate(labels)]
    return tuple(labels)


def read_tables(
    folders: Sequence[str | Path], labels: Sequence[str] = ()
) -> dict[str, pd.DataFrame]:
    """The audits' tables keyed by run label (``labels``, or :func:`run_labels`), in order.

    Raises:
        SafegeomError: a folder holds no audit, or the labels do not match the folders.
    """
    names = tuple(labels) or run_labels(folders)
    if len(names) != len(folders):
        raise SafegeomError(f"give one label per audit folder: {len(names)} for {len(folders)}")
    return {name: read_table(folder) for name, folder in zip(names, folders, strict=True)}


def save_figure(fig: Figure, path: str | Path, fmt: str | None = None) -> Path:
    """Write ``fig`` atomically as ``fmt`` (default: the path's suffix) in the plots' style.

    Returns:
        The path written.

    Raises:
        OutputPathError: the path cannot be written. SafegeomError: an unknown format.
    """
    target = Path(path)
    fmt = fmt or target.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise SafegeomError(f"cannot write {target}: format {fmt!r} is not one of {FORMATS}")
    metadata = {"CreationDate": None} if fmt == "pdf" else None  # same figure, same bytes
    with style(), atomic_write(target) as tmp:
        fig.savefig(tmp, format=fmt, dpi=DPI, bbox_inches="tight", metadata=metadata)
    return target


def write_figures(
    tables: Mapping[str, pd.DataFrame],
    out: str | Path,
    *,
    formats: Sequence[str] = ("png", "pdf"),
    progress: bool = False,
) -> tuple[list[Path], dict[str, str]]:
    """Every figure of :data:`safegeom.plots.FIGURES` the tables have rows for, in each format.

    Returns:
        ``(written, skipped)``: the files written in order, and figure name → why it was skipped.
    """
    from tqdm.auto import tqdm

    written: list[Path] = []
    skipped: dict[str, str] = {}
    for name, spec in tqdm(FIGURES.items(), desc="figures", unit="figure", disable=not progress):
        if not has_data(tables, name):
            why = f" ({spec.missing})" if spec.missing else ""
            skipped[name] = f"no {', '.join(spec.metrics)} rows in the audits{why}"
            continue
        fig = spec.plot(tables)
        written += [save_figure(fig, Path(out) / f"{name}.{fmt}", fmt) for fmt in formats]
    return written, skipped


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
    out = check_output_dir(command.out)
    tables = read_tables(command.audits, command.labels)
    written, skipped = write_figures(
        tables, out, formats=command.formats, progress=command.progress
    )
    if not written:
        raise SafegeomError(
            "the audits hold no rows any figure draws (" + "; ".join(skipped.values()) + ")"
        )
    if command.json:
        emit_json({
            "written": [str(p) for p in written],
            "skipped": skipped,
            "runs": dict(zip(tables, command.audits, strict=True)),
        })  # fmt: skip
        return 0
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    for path in written:
        print(f"wrote {path}")
    return 0


def figure_script(
    name: str,
    argv: Sequence[str] | None = None,
    *,
    choices: Mapping[str, Sequence[str]] | None = None,
) -> int:
    """The command line of one script under ``figures/``: ``AUDIT_DIR [AUDIT_DIR ...] [--labels
    A,B] [--out FILE]`` writes figure ``name`` (a key of :data:`safegeom.plots.FIGURES`) to FILE
    (default ``<name>.pdf``; the format from its suffix). ``choices`` adds options passed to the
    plot function as keywords (``{"metric": ("cosine_to_base", "direction_drift")}``: the first
    is the default).

    Returns:
        The exit status (2 with a one-line message for bad input).
    """
    import sys

    spec = FIGURES[name]
    parser = argparse.ArgumentParser(prog=f"figures/{name}.py", description=spec.what)
    parser.add_argument("audits", nargs="+", metavar="AUDIT_DIR", help="saved audit folders")
    parser.add_argument("--labels", default="", help="run labels, comma-separated")
    parser.add_argument("--out", default=f"{name}.pdf", help="file to write (.pdf, .png, .svg)")
    for option, values in (choices or {}).items():
        parser.add_argument(f"--{option.replace('_', '-')}", dest=option, choices=list(values),
                            default=values[0])  # fmt: skip
    args = parser.parse_args(argv)
    try:
        out = check_output_file(args.out)
        labels = tuple(x.strip() for x in args.labels.split(",") if x.strip())
        tables = read_tables(args.audits, labels)
        keywords = {option: getattr(args, option) for option in choices or {}}
        print(f"wrote {save_figure(spec.plot(tables, **keywords), out)}")
    except SafegeomError as err:
        print(f"{parser.prog}: error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    return 0
