"""Figure 2: cosine to base (or drift) of the re-extracted carriers as a step × layer heatmap."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from safegeom.plots.data import Tables, as_tables, carrier_layer, no_data, select, without_floor
from safegeom.plots.lines import STEP
from safegeom.plots.style import new_figure, style

__all__ = ["colour_scale", "digits", "drift_matrix", "plot_drift"]

MAX_ANNOTATED = 96
"""Heatmaps with at most this many cells print each cell's value."""

_LABELS = {
    "cosine_to_base": "cosine to base (sign fixed)",
    "direction_drift": "drift 1 − |cos| to base",
}


def drift_matrix(table: pd.DataFrame, metric: str, carrier: str) -> pd.DataFrame:
    """The per-layer ``metric`` of ``carrier`` as a layers × steps matrix (re-extracted source
    where there is one, never the ``floor`` rows; duplicates averaged).

    Returns:
        A DataFrame indexed by layer (ascending) with one column per step (ascending); empty when
        the table has no such rows.
    """
    rows = without_floor(select(table, metric, carrier=carrier, per_layer=True))
    if rows["source"].eq("reextracted").any():
        rows = rows[rows["source"].eq("reextracted")]
    if rows.empty:
        return pd.DataFrame()
    matrix = rows.pivot_table(index="layer", columns="step", values="value", aggfunc="mean")
    return matrix.sort_index().sort_index(axis=1)


def colour_scale(metric: str, matrices: Sequence[pd.DataFrame]) -> tuple[float, float, str]:
    """The shared scale of the heatmaps: cosine from its lowest value (rounded down at the order
    of magnitude of its gap to 1: 0.83 → 0.8, 0.991 → 0.99) to 1 on cividis (sequential,
    colour-blind safe), or [-1, 1] on PuOr (diverging) when a cosine is negative; drift from 0
    to its highest value (rounded up to 0.1, at least 0.1).

    Returns:
        ``(vmin, vmax, colour map name)``.
    """
    values = np.concatenate([m.to_numpy(dtype=float).ravel() for m in matrices] or [np.zeros(0)])
    values = values[np.isfinite(values)]
    if metric == "cosine_to_base":
        low = float(values.min()) if values.size else 0.0
        if low < 0:
            return -1.0, 1.0, "PuOr"
        step = 10.0 ** np.floor(np.log10(max(1.0 - low, 1e-3)))  # the gap's order of magnitude
        return max(0.0, float(np.floor(low / step - 1e-9) * step)), 1.0, "cividis"
    high = float(values.max()) if values.size else 1.0
    return 0.0, max(0.1, np.ceil(high * 10) / 10), "cividis"


def digits(matrices: Sequence[pd.DataFrame]) -> int:
    """Decimals of every annotated cell of one figure: 3 where all its values lie within 0.05 of
    each other (a narrow range's steps show), else 2.

    Example:
        >>> digits([pd.DataFrame([[0.991, 0.995]]), pd.DataFrame([[0.97]])])
        3
    """
    values = np.concatenate([m.to_numpy(dtype=float).ravel() for m in matrices] or [np.zeros(0)])
    finite = values[np.isfinite(values)]
    return 3 if finite.size and np.ptp(finite) < 0.05 else 2


def _ticks(count: int, most: int = 8, keep: int | None = None) -> np.ndarray:
    picks = np.linspace(0, count - 1, min(count, most)).round().astype(int)
    return np.unique(np.append(picks, [] if keep is None else [keep]).astype(int))


def _mark(ax: Axes, layers: list, layer: int | None, columns: int) -> int | None:
    """Outline the row of ``layer`` (the base's carrier layer) with a dashed box.

    Returns:
        Its row index, or None where the matrix has no such row.
    """
    if layer is None or layer not in layers:
        return None
    row = layers.index(layer)
    box = Rectangle(
        (-0.5, row - 0.5),
        columns,
        1.0,
        fill=False,
        edgecolor="#D55E00",
        linestyle="--",
        linewidth=1.2,
        zorder=3,
    )
    ax.add_patch(box)
    return row


def _heat(
    ax: Axes,
    matrix: pd.DataFrame,
    scale: tuple[float, float, str],
    decimals: int,
    marked: int | None = None,
) -> object:
    vmin, vmax, cmap = scale
    image = ax.imshow(
        matrix.to_numpy(dtype=float),
        origin="lower",
        aspect="auto",
        vmin=vmin,
        vmax=vmax,
        cmap=cmap,
        interpolation="nearest",
    )
    values = matrix.to_numpy(dtype=float)
    if values.size <= MAX_ANNOTATED:  # small audits: print each cell's number too
        shade = image.cmap(image.norm(values))
        light = (0.299 * shade[..., 0] + 0.587 * shade[..., 1] + 0.114 * shade[..., 2]) > 0.55
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                ax.text(
                    j,
                    i,
                    f"{value:.{decimals}f}",
                    ha="center",
                    va="center",
                    fontsize=5.5,
                    color="black" if light[i, j] else "white",
                )
    steps, layers = list(matrix.columns), list(matrix.index)
    row = _mark(ax, layers, marked, len(steps))
    xt, yt = _ticks(len(steps)), _ticks(len(layers), 10, row)
    ax.set_xticks(xt, [str(steps[i]) for i in xt])
    ax.set_yticks(yt, [f"{layers[i]}" + (r" ($r_0$)" if i == row else "") for i in yt])
    ax.grid(False)
    note = "\ndashed box: the base's carrier layer (r$_0$'s)" if row is not None else ""
    ax.set_xlabel(STEP + " (one column per checkpoint)" + note)
    ax.set_ylabel("layer")
    return image


def plot_drift(
    tables: Tables,
    *,
    metric: str = "cosine_to_base",
    carriers: Sequence[str] = ("refusal", "harmfulness"),
) -> Figure:
    """Figure 2: per-layer ``metric`` (``cosine_to_base`` or ``direction_drift``) of the
    re-extracted carriers, one heatmap per run (rows) and carrier (columns), checkpoints as equal
    columns labelled by step, on one colour scale (:func:`colour_scale`), every cell's number
    with the same decimals (:func:`digits`), and the base's carrier layer (r₀'s) outlined by a
    dashed box and its tick marked. Panels without rows say so.

    Returns:
        The figure.
    """
    named = as_tables(tables)
    carriers = tuple(carriers)
    matrices = {
        (label, c): drift_matrix(t, metric, c) for label, t in named.items() for c in carriers
    }
    scale = colour_scale(metric, list(matrices.values()))
    decimals = digits(list(matrices.values()))  # one number format for every panel
    with style():
        rows = len(named)
        fig = new_figure(rows, len(carriers), height=2.4 if rows > 1 else 2.7)
        axes = np.array(fig.axes).reshape(rows, len(carriers))
        image, drawn = None, False
        for r, label in enumerate(named):
            for c, carrier in enumerate(carriers):
                ax = axes[r, c]
                ax.set_title(", ".join(p for p in (label, f"{carrier} direction") if p))
                matrix = matrices[label, carrier]
                if matrix.empty:
                    no_data(ax, f"no per-layer {metric} rows for {carrier} in this audit")
                    continue
                marked = carrier_layer(named[label])
                image, drawn = _heat(ax, matrix, scale, decimals, marked), True
        if image is not None:
            fig.colorbar(image, ax=list(axes.flat), shrink=0.9, label=_LABELS.get(metric, metric))
        title = (
            f"{_LABELS.get(metric, metric).capitalize()} of the re-extracted carriers, per layer"
        )
        fig.suptitle(title if drawn else title + ": no data in this audit")
        return fig
