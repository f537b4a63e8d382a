"""The figures' one style: the Okabe–Ito palette, paper-size fonts, and a context that applies it.

Every plot function builds its :class:`~matplotlib.figure.Figure` inside :func:`style`, so the
rcParams below are read when the artists are made and the global state is restored afterwards
(nothing is left in pyplot: figures are made with ``Figure()``, never ``plt.figure``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import matplotlib as mpl
from matplotlib.figure import Figure

__all__ = [
    "LINESTYLES",
    "MARKERS",
    "PALETTE",
    "STYLE",
    "WIDTH",
    "new_figure",
    "run_colour",
    "style",
]

PALETTE: tuple[str, ...] = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow (last: weak on white)
    "#000000",  # black
)
"""Okabe & Ito's colour-blind-safe palette; one colour per run, in the order given."""

LINESTYLES: tuple[Any, ...] = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
"""Line styles for the variants of one run (prompt set, source, basis vector)."""

MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X")
"""Markers paired with :data:`LINESTYLES`, so variants differ without colour."""

WIDTH = 7.0
"""Figure width in inches: a two-column paper's text width (fonts below stay readable there)."""

STYLE: dict[str, Any] = {
    "font.size": 8,
    "axes.titlesize": 8.5,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 6.5,
    "legend.framealpha": 0.85,
    "legend.borderpad": 0.3,
    "legend.handlelength": 2.6,
    "figure.titlesize": 9.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.4,
    "lines.markersize": 3.5,
    "axes.prop_cycle": mpl.cycler(color=list(PALETTE)),
    "image.cmap": "cividis",
    "pdf.fonttype": 42,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
}
"""The rcParams every figure is made under."""


@contextlib.contextmanager
def style() -> Iterator[None]:
    """Apply :data:`STYLE` for the body; the previous rcParams come back afterwards."""
    with mpl.rc_context(STYLE):
        yield


def run_colour(index: int) -> str:
    """The colour of the ``index``-th run (the palette repeats after eight)."""
    return PALETTE[index % len(PALETTE)]


def new_figure(rows: int, cols: int, *, height: float = 2.3, width: float = WIDTH) -> Figure:
    """A constrained-layout :class:`Figure` of ``rows`` × ``cols`` panels at paper width.

    Returns:
        The figure, with its axes made (``fig.axes`` in row-major order).
    """
    fig = Figure(figsize=(width, height * rows), layout="constrained")
    fig.subplots(rows, cols, squeeze=False)
    return fig
