"""Figure 5: fixed-source ablation and addition effects vs step, against the random controls."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from safegeom.plots.data import Tables, as_tables, draw_lines, figure_legend, no_data, select
from safegeom.plots.lines import STEP
from safegeom.plots.style import new_figure, run_colour, style

__all__ = ["plot_causal"]

_WHAT = {
    "ablation": ("ablate r, harmful prompts", "Δ refusal score (log-odds)"),
    "addition": ("add r, harmless prompts", "Δ refusal score (log-odds)"),
}


def _series(rows: pd.DataFrame) -> pd.Series:
    """Mean value per step (over prompt sets) of the carrier-layer rows."""
    rows = rows[rows["layer"].isna()] if rows["layer"].isna().any() else rows
    return rows.groupby("step")["value"].mean().sort_index()


def _against_controls(
    ax: Axes, named: dict[str, pd.DataFrame], kind: str, carrier: str, source: str
) -> bool:
    """Raw effect of each run as a line, its controls' mean ± std as a band in the same colour.

    Returns:
        Whether anything was drawn.
    """
    title, ylabel = _WHAT[kind]
    ax.set_title(f"{title}: effect vs controls")
    drawn = False
    for index, (label, table) in enumerate(named.items()):
        raw = select(table, f"{kind}_raw", carrier=carrier, source=source)
        mean = select(table, f"{kind}_control_mean", carrier=carrier, source=source)
        std = select(table, f"{kind}_control_std", carrier=carrier, source=source)
        if raw.empty or mean.empty:
            continue
        colour, prefix = run_colour(index), f"{label}, " if label else ""
        effect = _series(raw)
        ax.plot(effect.index.to_numpy(dtype=float), effect.to_numpy(dtype=float), color=colour,
                marker="D", linestyle="-.", label=f"{prefix}{source}, raw effect")  # fmt: skip
        centre = _series(mean)
        spread = _series(std).reindex(centre.index).fillna(0.0) if not std.empty else 0 * centre
        steps = centre.index.to_numpy(dtype=float)
        ax.plot(steps, centre.to_numpy(dtype=float), color=colour, linestyle=":", linewidth=1.0,
                label=f"{prefix}random controls ± std")  # fmt: skip
        low = (centre - spread).to_numpy(dtype=float)
        high = (centre + spread).to_numpy(dtype=float)
        ax.fill_between(steps, low, high, color=colour, alpha=0.18, linewidth=0)
        drawn = True
    if not drawn:
        no_data(ax, f"no {kind}_raw / {kind}_control_mean rows in this audit")
        return False
    ax.set_xlabel(STEP)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return True


def _net(
    ax: Axes, named: dict[str, pd.DataFrame], kind: str, carrier: str, sources: Sequence[str]
) -> bool:
    """Effect − control with its paired-bootstrap CI, per run and source, and the zero line.

    Returns:
        Whether anything was drawn.
    """
    title = _WHAT[kind][0]
    ax.set_title(f"{title}: effect − controls")
    picked = {}
    for label, table in named.items():
        rows = select(table, f"{kind}_effect", carrier=carrier, source=sources)
        picked[label] = rows[rows["layer"].isna()] if rows["layer"].isna().any() else rows
    keys = ["source"] if len(sources) > 1 else []
    if not draw_lines(ax, picked, keys=keys, suffix="effect − controls"):
        no_data(ax, f"no {kind}_effect rows in this audit")
        return False
    ax.axhline(0.0, color="0.3", linewidth=0.8, zorder=0)
    ax.set_xlabel(STEP)
    ax.set_ylabel("net Δ refusal score (log-odds)\n(95% paired bootstrap CI)")
    return True


def plot_causal(
    tables: Tables, *, carrier: str = "refusal", sources: Sequence[str] = ("fixed", "reextracted")
) -> Figure:
    """Figure 5: does the base's carrier still control refusal? Top row: the fixed-source ablation
    and addition effects (``*_raw``) against the band of their matched random directions
    (``*_control_mean`` ± ``*_control_std``); bottom row: effect − control (``*_effect``) with
    its CI, for each of ``sources`` (fixed solid, re-extracted dashed). A row with no rows for it
    says so; the figure title says when the audit has no causal rows at all.

    Returns:
        The figure (2 × 2 panels).
    """
    named = as_tables(tables)
    sources = tuple(sources)
    with style():
        fig = new_figure(2, 2, height=2.7)
        axes = np.array(fig.axes).reshape(2, 2)
        drawn = []
        for col, kind in enumerate(("ablation", "addition")):
            drawn.append(_against_controls(axes[0, col], named, kind, carrier, "fixed"))
            drawn.append(_net(axes[1, col], named, kind, carrier, sources))
        title = f"Fixed-source causal tests of the base's {carrier} carrier"
        fig.suptitle(title if any(drawn) else title + ": no data in this audit")
        figure_legend(fig)
        return fig
