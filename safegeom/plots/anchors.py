"""Figure 9: the geometry against several anchors (``safegeom audit --anchor NAME=MODEL``).

Per anchor, the re-extracted refusal direction's cosine to that anchor's r₀ and the H/R coupling
vs step (one line per anchor, the base's among them); and the all-anchor summary: per step, the
mean over every anchor of the refusal and harmfulness cosines, with the range across anchors as
the band.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from safegeom.audit.schema import BASE_ANCHOR
from safegeom.plots.data import (
    Tables,
    as_tables,
    at_carrier_layer,
    carrier_layer,
    draw_lines,
    no_data,
    select,
)
from safegeom.plots.lines import STEP, finish_figure, line_panel
from safegeom.plots.style import new_figure, style

__all__ = ["anchor_names", "anchor_summary", "plot_anchors"]

_COSINE = "cosine to the anchor's direction"


def anchor_names(table: pd.DataFrame) -> list[str]:
    """The anchors a table was measured against besides the base, in order of appearance.

    Example:
        >>> from safegeom.audit.schema import frame
        >>> rows = [
        ...     {"step": 0, "metric": "cosine_to_base", "value": 1.0, "anchor": a}
        ...     for a in ("base", "s1")
        ... ]
        >>> anchor_names(frame(rows))
        ['s1']
    """
    anchors = table["anchor"].dropna().astype(str).unique().tolist()
    return [a for a in anchors if a != BASE_ANCHOR]


def anchor_summary(table: pd.DataFrame, carrier: str) -> pd.DataFrame:
    """Per step, the re-extracted ``carrier``'s cosine to every anchor's direction (the base's
    too) at the base's carrier layer: ``value`` the mean over anchors, ``ci_low``/``ci_high`` their
    minimum and maximum, ``n`` the number of anchors.

    Returns:
        One row per step (columns step, carrier, value, ci_low, ci_high, n; empty without rows).
    """
    rows = select(table, "cosine_to_base", carrier=carrier, source="reextracted", anchor=None)
    rows, _ = at_carrier_layer(rows, carrier_layer(table))
    if rows.empty:
        return pd.DataFrame(columns=["step", "carrier", "value", "ci_low", "ci_high", "n"])
    per_anchor = rows.groupby(["step", "anchor"])["value"].mean().reset_index()
    summary = per_anchor.groupby("step")["value"].agg(
        value="mean", ci_low="min", ci_high="max", n="count"
    )
    return summary.reset_index().assign(carrier=carrier)


def _summary_panel(ax: Axes, named: dict[str, pd.DataFrame]) -> bool:
    """Mean over anchors of the refusal and harmfulness cosines vs step, band: their range."""
    ax.set_title("all anchors (band: range)")
    picked = {
        label: pd.concat(
            [anchor_summary(table, c) for c in ("refusal", "harmfulness")], ignore_index=True
        )
        for label, table in named.items()
    }
    picked = {label: rows.assign(source=pd.NA) for label, rows in picked.items()}
    styles = {("harmfulness",): 2, ("refusal",): 3}  # not the per-anchor panels' first styles
    drawn = draw_lines(
        ax, picked, keys=["carrier"], bands=True, style_of=styles, suffix="mean over anchors"
    )
    if not drawn:
        no_data(ax, "no cosine_to_base rows of the refusal or harmfulness direction")
        return False
    ax.set_xlabel(f"{STEP}\nat the base's carrier layer")
    ax.set_ylabel(_COSINE)
    return True


def plot_anchors(tables: Tables) -> Figure:
    """Figure 9: per anchor, the cosine of the checkpoint's refusal direction to the anchor's and
    the H/R coupling vs step at the base's carrier layer (one line style per anchor, ``base``
    among them), and the all-anchor summary (mean over anchors, band the range).

    Returns:
        The figure (three panels).

    Example:
        >>> from safegeom.audit.schema import frame
        >>> rows = [
        ...     {"checkpoint": c, "step": s, "layer": 1, "carrier": "refusal", "anchor": a,
        ...      "source": "reextracted", "metric": "cosine_to_base", "value": v}
        ...     for c, s in (("base", 0), ("step-2", 2))
        ...     for a, v in (("base", 1.0 - s / 10), ("s1", 0.9 - s / 10))
        ... ]
        >>> len(plot_anchors(frame(rows)).axes)
        3
    """
    named = as_tables(tables)
    with style():
        fig = new_figure(1, 3, height=3.1)
        a, b, c = fig.axes
        drawn = [
            line_panel(
                a,
                named,
                "cosine_to_base",
                title=r"$r_t$: cosine to each anchor's $r_0$",
                ylabel=_COSINE,
                carrier="refusal",
                source="reextracted",
                always=("anchor",),
            ),
            line_panel(
                b,
                named,
                "hr_coupling",
                title="H/R coupling per anchor",
                ylabel="|cos(h, r)| (unitless)",
                carrier="hr",
                source="reextracted",
                always=("anchor",),
            ),
            _summary_panel(c, named),
        ]
        return finish_figure(fig, "Geometry against every anchor", drawn)
