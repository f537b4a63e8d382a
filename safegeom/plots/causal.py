"""Figure 5: fixed-source ablation and addition effects vs step, against the random controls, and
the un-intervened score they start from (floor effects)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from safegeom.plots.data import (
    Tables,
    as_tables,
    draw_lines,
    figure_legend,
    no_data,
    select,
    step_ticks,
)
from safegeom.plots.lines import STEP
from safegeom.plots.style import new_figure, run_colour, style

__all__ = ["plot_causal"]

_WHAT = {
    "ablation": ("ablate r, harmful prompts", "Δ refusal score (log-odds)"),
    "addition": ("add r, harmless prompts", "Δ refusal score (log-odds)"),
}
SATURATED = "saturated: un-intervened score within the margin of the end the intervention pushes to"
"""The legend entry of the ring around a saturated cell (an effect near 0 may mean "nothing left to
move")."""


def _saturated_steps(rows: pd.DataFrame) -> set[float]:
    """The steps at which any of ``rows`` is flagged ``saturated``."""
    flagged = rows[rows["saturated"].fillna(False).astype(bool)]
    return {float(s) for s in flagged["step"]}


def _ring(ax: Axes, steps: pd.Series, values: pd.Series, saturated: set[float]) -> None:
    """An open ring around each point of ``values`` (indexed by step) at a saturated step."""
    marked = [(s, v) for s, v in zip(steps, values, strict=True) if float(s) in saturated]
    if marked:
        xs, ys = zip(*marked, strict=True)
        ax.scatter(
            xs,
            ys,
            s=90,
            facecolors="none",
            edgecolors="0.15",
            linewidths=1.0,
            zorder=4,
            label=SATURATED,
        )


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
        ax.plot(
            effect.index.to_numpy(dtype=float),
            effect.to_numpy(dtype=float),
            color=colour,
            marker="D",
            linestyle="-.",
            label=f"{prefix}{source}, raw effect",
        )
        centre = _series(mean)
        spread = _series(std).reindex(centre.index).fillna(0.0) if not std.empty else 0 * centre
        steps = centre.index.to_numpy(dtype=float)
        ax.plot(
            steps,
            centre.to_numpy(dtype=float),
            color=colour,
            linestyle=":",
            linewidth=1.0,
            label=f"{prefix}random controls ± std",
        )
        low = (centre - spread).to_numpy(dtype=float)
        high = (centre + spread).to_numpy(dtype=float)
        ax.fill_between(steps, low, high, color=colour, alpha=0.18, linewidth=0)
        drawn = True
    if not drawn:
        no_data(ax, f"no {kind}_raw / {kind}_control_mean rows in this audit")
        return False
    ax.set_xlabel(STEP)
    ax.set_ylabel(ylabel)
    step_ticks(ax, [line.get_xdata() for line in ax.get_lines()])
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
    for label, rows in picked.items():
        saturated = _saturated_steps(rows)
        for line in ax.get_lines():
            text = line.get_label()
            if saturated and not text.startswith("_") and text.startswith(label):
                _ring(ax, line.get_xdata(), line.get_ydata(), saturated)
    ax.set_xlabel(STEP)
    ax.set_ylabel("net Δ refusal score (log-odds)\n(95% paired bootstrap CI)")
    return True


def _unintervened(ax: Axes, named: dict[str, pd.DataFrame], kind: str, carrier: str) -> bool:
    """The un-intervened mean refusal score (``{kind}_base``) of the prompts each effect is
    measured on, per run, with saturated cells ringed.

    Returns:
        Whether anything was drawn.
    """
    title = _WHAT[kind][0].split(", ")[1]
    ax.set_title(f"un-intervened score, {title}")
    drawn = False
    for index, (label, table) in enumerate(named.items()):
        rows = select(table, f"{kind}_base", carrier=carrier)
        if rows.empty:
            continue
        score = _series(rows)
        steps, values = score.index.to_numpy(dtype=float), score.to_numpy(dtype=float)
        name = ", ".join(p for p in (label, "un-intervened score") if p)
        ax.plot(steps, values, color=run_colour(index), linestyle="-", marker="o", label=name)
        _ring(ax, steps, values, _saturated_steps(rows))
        drawn = True
    if not drawn:
        no_data(ax, f"no {kind}_base rows in this audit (audited before floor effects)")
        return False
    ax.set_xlabel(STEP)
    ax.set_ylabel("refusal score (log-odds)")
    step_ticks(ax, [line.get_xdata() for line in ax.get_lines()])
    return True


def plot_causal(
    tables: Tables, *, carrier: str = "refusal", sources: Sequence[str] = ("fixed", "reextracted")
) -> Figure:
    """Figure 5: does the base's carrier still control refusal? Top row: the fixed-source ablation
    and addition effects (``*_raw``) against the band of their matched random directions
    (``*_control_mean`` ± ``*_control_std``); bottom row: effect − control (``*_effect``) with
    its CI, for each of ``sources`` (fixed solid, re-extracted dashed); third row: the
    un-intervened score the effects start from (``*_base``), so a floor effect shows. Cells
    flagged ``saturated`` are ringed in the bottom two rows. A panel with no rows for it says so;
    the figure title says when the audit has no causal rows at all.

    Returns:
        The figure (3 × 2 panels, row-major in ``fig.axes``).
    """
    named = as_tables(tables)
    sources = tuple(sources)
    with style():
        fig = new_figure(3, 2, height=2.5)
        axes = np.array(fig.axes).reshape(3, 2)
        drawn = []
        for col, kind in enumerate(("ablation", "addition")):
            drawn.append(_against_controls(axes[0, col], named, kind, carrier, "fixed"))
            drawn.append(_net(axes[1, col], named, kind, carrier, sources))
            drawn.append(_unintervened(axes[2, col], named, kind, carrier))
        title = f"Fixed-source causal tests of the base's {carrier} carrier"
        fig.suptitle(title if any(drawn) else title + ": no data in this audit")
        figure_legend(fig)
        return fig
