"""Figures of saved audits as files: read the audits, save figures atomically, write them all.

:mod:`safegeom.plots` draws (data in, ``Figure`` out, no I/O); this module is where figures meet
the disk, for ``safegeom figures``, the scripts under ``figures/`` and the demo's report. Every
file goes through the artifact layer (atomic); PDFs carry no creation date, so the same figure
gives the same bytes.

Example (``read_tables(["runs/audit"])`` reads the tables of saved audits instead):
    >>> import tempfile
    >>> from safegeom.audit.schema import frame
    >>> table = frame([{"checkpoint": "base", "step": 0, "metric": "asr", "value": 0.1}])
    >>> written, skipped = write_figures({"LoRA": table}, tempfile.mkdtemp(), formats=("png",))
    >>> [path.name for path in written]
    ['fig1_behaviour.png']
    >>> sorted(skipped)  # figures whose rows the table lacks
    ['fig2_drift', 'fig3_coupling', 'fig4_subspace', 'fig5_causal', 'fig6_coordinates', 'fig8_interference']
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from safegeom.artifacts import atomic_write, check_output_file
from safegeom.audit.result import load_audit
from safegeom.errors import SafegeomError
from safegeom.plots import FIGURES, has_data, style
from safegeom.plots.anchors import anchor_names

__all__ = [
    "DPI",
    "FORMATS",
    "figure_script",
    "read_table",
    "read_tables",
    "run_labels",
    "save_figure",
    "write_figures",
]

FORMATS = ("png", "pdf", "svg")
"""Image formats ``--formats`` accepts."""
DPI = 200
"""Resolution of raster formats (PNG), dots per inch."""


def read_table(folder: str | Path) -> pd.DataFrame:
    """The tidy table of the audit saved in ``folder``.

    Raises:
        NotFoundError: no such folder. ArtifactError: it holds no finished audit.
    """
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
    results = {name: load_audit(folder) for name, folder in zip(names, folders, strict=True)}
    warn_different_bases({name: r.manifest for name, r in results.items()})
    return {name: r.table for name, r in results.items()}


def _base_of(manifest: Mapping[str, Any]) -> tuple[str, str]:
    """``(what identifies the base, how to name it)`` of an audit manifest: the base's weight
    hash when recorded, else its path."""
    identity = manifest.get("identity") or {}
    path = str(identity.get("base") or (manifest.get("inputs") or {}).get("base", {}).get("path"))
    return str(manifest.get("base_hash") or path), path


def warn_different_bases(manifests: Mapping[str, Mapping[str, Any]]) -> bool:
    """Warn when the audits to overlay start from different base models (their curves measure
    different models, so the overlay compares unlike things).

    Returns:
        Whether a warning was given.
    """
    bases = {label: _base_of(m) for label, m in manifests.items()}
    if len({key for key, _ in bases.values()}) <= 1:
        return False
    named = "; ".join(f"{label}: {path}" for label, (_, path) in bases.items())
    warnings.warn(
        f"the audits have different base models ({named}); their figures are overlaid, but "
        "the runs are not comparable",
        stacklevel=2,
    )
    return True


def all_nan_metrics(tables: Mapping[str, pd.DataFrame]) -> set[str]:
    """The metrics whose every row, in every table, has a NaN value: nothing to draw.

    Returns:
        Their names.
    """
    rows = pd.concat([t[["metric", "value"]] for t in tables.values()], ignore_index=True)
    if rows.empty:
        return set()
    finite = rows.assign(ok=rows["value"].notna()).groupby("metric")["ok"].any()
    return {str(m) for m, ok in finite.items() if not ok}


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

    Metrics whose values are all NaN count as missing (:func:`all_nan_metrics`). A figure of
    anchors (figure 9) is neither written nor listed as skipped for audits without anchors.

    Returns:
        ``(written, skipped)``: the files written in order, and figure name → why it was skipped.
    """
    from tqdm.auto import tqdm

    written: list[Path] = []
    skipped: dict[str, str] = {}
    empty = all_nan_metrics(tables)  # treated as missing
    tables = {label: t[~t["metric"].isin(empty)] for label, t in tables.items()}
    for name, spec in tqdm(FIGURES.items(), desc="figures", unit="figure", disable=not progress):
        if not has_data(tables, name):
            if spec.anchored and not any(_anchored(t) for t in tables.values()):
                continue  # an audit without anchors lacks nothing: no figure, no note
            nan = [m for m in spec.metrics if m in empty]
            why = f" ({spec.missing})" if spec.missing else ""
            if nan:
                why = f" ({', '.join(nan)} rows are all NaN)"
            what = "rows measured against an anchor" if spec.anchored else "rows"
            skipped[name] = f"no {', '.join(spec.metrics)} {what} in the audits{why}"
            continue
        fig = spec.plot(tables)
        written += [save_figure(fig, Path(out) / f"{name}.{fmt}", fmt) for fmt in formats]
    return written, skipped


def _anchored(table: pd.DataFrame) -> bool:
    """Whether the table holds rows measured against an anchor besides the base."""
    return "anchor" in table.columns and bool(anchor_names(table))


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
        parser.add_argument(
            f"--{option.replace('_', '-')}", dest=option, choices=list(values), default=values[0]
        )
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
