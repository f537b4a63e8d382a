"""Picking rows out of audit tables and drawing them as lines with CI bands.

An audit table is a DataFrame with the columns of :data:`safegeom.audit.schema.COLUMNS`. The
plot functions take one table or several keyed by run label (``{"LoRA": t1, "defended": t2}``);
runs get the palette's colours in order, and the other keys that vary inside a run (anchor, prompt
set, source, basis vector) get line styles and markers.

Anchors (``safegeom audit --anchor``): :func:`select` keeps the base's rows unless asked for others,
so step × layer views stay the base's; the line panels ask for every anchor and draw one line per
anchor, as they draw one per variant.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from safegeom.audit.schema import BASE_ANCHOR, COLUMNS, with_anchor
from safegeom.errors import SafegeomError
from safegeom.plots.style import LINESTYLES, MARKERS, run_colour

__all__ = [
    "BANDS_OMITTED",
    "Tables",
    "as_tables",
    "at_carrier_layer",
    "carrier_layer",
    "draw_floor",
    "draw_lines",
    "figure_legend",
    "floor_label",
    "no_data",
    "select",
    "step_ticks",
    "variant_keys",
    "without_floor",
]

Tables = pd.DataFrame | Mapping[str, pd.DataFrame]
"""One audit table, or several keyed by run label (the order of the mapping is the colour order)."""

_VARIANT_COLUMNS = ("anchor", "carrier", "source", "prompts", "judge")
MAX_BANDS = 4
"""Most lines in one panel that still get their CI band by default."""
_AT_CARRIER_LAYER = (
    "projection_separation",
    "coordinate_imbalance",
    "ablation_effect",
    "addition_effect",
)
DISPLAY = {"hr": "directions h, r", "hr-cone": "h vs cone B"}
FLOOR = "floor"
"""The ``source`` of a noise-floor row (:mod:`safegeom.audit.floors`): drawn as a band, never a
line."""
HATCHES = ("///", "\\\\\\", "...", "xxx")
"""Hatches of the floor bands of one run's carriers (told apart without colour)."""
BANDS_OMITTED = f"95% CI bands omitted (over {MAX_BANDS} lines in a panel; CIs in the table)"
"""The legend's note where a panel drew its lines without their CI bands."""
_OMITTED: weakref.WeakSet[Axes] = weakref.WeakSet()
"""Panels that left out CI bands they had (:func:`figure_legend` says so)."""
MAX_TICKS = 10
"""Most checkpoint steps that each get a tick (more are thinned evenly, first and last kept)."""
"""How carrier names read in legends."""


def as_tables(tables: Tables) -> dict[str, pd.DataFrame]:
    """The audit tables keyed by run label (one table alone, or one run in a mapping, gets the
    label ``""``: a single run's legend entries carry no run-label prefix); a table made before
    the ``anchor`` column gets it (:func:`~safegeom.audit.schema.with_anchor`).

    Raises:
        SafegeomError: a table lacks audit columns, or no table is given.
    """
    named = {"": tables} if isinstance(tables, pd.DataFrame) else dict(tables)
    named = {k: with_anchor(t) if "metric" in t.columns else t for k, t in named.items()}
    if not named:
        raise SafegeomError("no audit table given; pass a table or {run label: table}")
    for label, table in named.items():
        missing = [c for c in COLUMNS if c not in table.columns]
        if missing:
            run = f" of run {label!r}" if label else ""
            raise SafegeomError(
                f"audit table{run} lacks columns {missing}; give a table with "
                "safegeom.audit.schema.COLUMNS (e.g. load_audit(DIR).table)"
            )
    return {"": next(iter(named.values()))} if len(named) == 1 else named


def select(
    table: pd.DataFrame,
    metric: str | Sequence[str],
    *,
    carrier: str | Sequence[str] | None = None,
    source: str | Sequence[str] | None = None,
    per_layer: bool | None = None,
    anchor: str | Sequence[str] | None = BASE_ANCHOR,
) -> pd.DataFrame:
    """The rows of ``metric`` (and ``carrier``/``source`` when given; ``per_layer`` True keeps
    rows with a layer, False rows without one), measured against ``anchor`` (default the base;
    rows that are not per anchor, such as behaviour, always kept; None: every anchor).

    Returns:
        A copy of the matching rows (possibly empty).
    """

    def among(column: str, wanted: str | Sequence[str]) -> pd.Series:
        values = [wanted] if isinstance(wanted, str) else list(wanted)
        return table[column].isin(values).fillna(False).astype(bool)

    keep = among("metric", metric)
    if carrier is not None:
        keep &= among("carrier", carrier)
    if source is not None:
        keep &= among("source", source)
    if per_layer is not None:
        keep &= table["layer"].notna() if per_layer else table["layer"].isna()
    if anchor is not None:
        keep &= among("anchor", anchor) | table["anchor"].isna()
    return table.loc[keep].copy()


def carrier_layer(table: pd.DataFrame) -> int | None:
    """The base's refusal-carrier layer of an audit: the layer of its rows that exist only there
    (projection separation, coordinate statistics, causal effects).

    Returns:
        That layer, or None when the table has no such rows.
    """
    rows = select(table, list(_AT_CARRIER_LAYER), per_layer=True)
    return None if rows.empty else int(rows["layer"].mode().iloc[0])


def at_carrier_layer(rows: pd.DataFrame, layer: int | None = None) -> tuple[pd.DataFrame, str]:
    """The rows to draw one number per step from: those not per layer; failing those, the rows at
    ``layer`` (the carrier's, :func:`carrier_layer`); failing those, the mean over layers per
    step and variant with its min–max range as the band.

    Returns:
        ``(rows, note)``: the rows and ``""``, ``"at layer L"`` or ``"mean over layers (band:
        range)"``.
    """
    whole = rows[rows["layer"].isna()]
    if not whole.empty or rows.empty:
        return whole, ""
    if layer is not None and rows["layer"].eq(layer).any():
        return rows[rows["layer"].eq(layer)], f"at layer {layer}, the base's carrier layer"
    keys = ["step", *[c for c in _VARIANT_COLUMNS if rows[c].notna().any()], "metric"]
    grouped = rows.groupby(keys, dropna=False)["value"]
    summary = grouped.agg(value="mean", ci_low="min", ci_high="max").reset_index()
    for column in _VARIANT_COLUMNS:
        if column not in summary:
            summary[column] = pd.NA
    return summary, "mean over layers (band: range)"


def variant_keys(selections: Sequence[pd.DataFrame]) -> list[str]:
    """The columns among carrier, source, prompts and judge whose value varies across the rows
    (judge left out when each prompt set has one judge).

    Returns:
        Those column names, in that order (the line style of a run's variants is keyed on them).
    """
    rows = [s for s in selections if not s.empty]
    if not rows:
        return []
    both = pd.concat(rows, ignore_index=True).astype({c: "string" for c in _VARIANT_COLUMNS})
    names = [c for c in _VARIANT_COLUMNS if both[c].nunique(dropna=False) > 1]
    one_judge = both.groupby("prompts", dropna=False)["judge"].nunique(dropna=False).max() <= 1
    if "judge" in names and "prompts" in names and one_judge:  # the set says it all
        names.remove("judge")
    return names


def _variant_label(key: tuple, names: Sequence[str]) -> str:
    parts = []
    for name, value in zip(names, key, strict=True):
        if pd.isna(value):
            continue
        parts.append(DISPLAY.get(str(value), str(value)) if name != "judge" else f"judge {value}")
    return ", ".join(parts)


def draw_lines(
    ax: Axes,
    selections: Mapping[str, pd.DataFrame],
    *,
    keys: Sequence[str] | None = None,
    bands: bool | None = None,
    style_of: Mapping[object, int] | None = None,
    always: Sequence[str] = (),
    suffix: str = "",
) -> int:
    """Draw ``value`` vs ``step`` for each run and variant, with ``ci_low``–``ci_high`` bands.

    ``selections`` maps run label → the rows to draw. Colour is the run; line style and marker the
    variant (the ``keys`` columns, by default those that vary; ``style_of`` fixes the style index
    of a variant key tuple; ``always`` columns are keys even when constant). Labels read
    ``run, variant[, suffix]``. Duplicate steps of one variant are averaged. ``bands`` None draws the
    CI bands when there are at most :data:`MAX_BANDS` lines (more would hide each other); a panel
    that leaves out bands it has gets the note :data:`BANDS_OMITTED` in the figure's legend.

    Returns:
        The number of lines drawn.
    """
    selections = {label: without_floor(rows) for label, rows in selections.items()}
    names = list(variant_keys(list(selections.values())) if keys is None else keys)
    names = [c for c in _VARIANT_COLUMNS if c in names or c in always]
    order: dict[tuple, int] = dict(style_of or {})
    drawn = 0
    if bands is None:
        total = sum(
            len(rows.groupby(names, dropna=False)) if names else 1
            for rows in selections.values()
            if not rows.empty
        )
        bands = total <= MAX_BANDS
    for index, (label, rows) in enumerate(selections.items()):
        if rows.empty:
            continue
        colour = run_colour(index)
        groups = rows.groupby(names, dropna=False, sort=True) if names else [((), rows)]
        for key, part in groups:
            key = key if isinstance(key, tuple) else (key,)
            style = order.setdefault(key, len(order))
            series = part.groupby("step")[["value", "ci_low", "ci_high"]].mean().sort_index()
            steps = series.index.to_numpy(dtype=float)
            text = ", ".join(p for p in (label, _variant_label(key, names), suffix) if p)
            ax.plot(
                steps,
                series["value"].to_numpy(dtype=float),
                color=colour,
                linestyle=LINESTYLES[style % len(LINESTYLES)],
                marker=MARKERS[style % len(MARKERS)],
                label=text or None,
            )
            low = series["ci_low"].to_numpy(dtype=float)
            high = series["ci_high"].to_numpy(dtype=float)
            finite = np.isfinite(low) & np.isfinite(high)
            if bands and finite.any():
                ax.fill_between(
                    steps, low, high, where=finite, color=colour, alpha=0.15, linewidth=0
                )
            elif finite.any():
                _OMITTED.add(ax)
            drawn += 1
    step_ticks(ax, [rows["step"] for rows in selections.values() if not rows.empty])
    return drawn


def without_floor(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows whose ``source`` is not :data:`FLOOR` (floor rows are bands, never data)."""
    floor = rows["source"].astype("string").eq(FLOOR).fillna(False).astype(bool)
    return rows.loc[~floor]


def step_ticks(ax: Axes, steps: Sequence[pd.Series | Sequence[float]]) -> None:
    """Ticks at the checkpoints' steps (the union of ``steps``; at most :data:`MAX_TICKS`, thinned
    evenly with the first and last kept)."""
    values = sorted({float(s) for part in steps for s in part if pd.notna(s)})
    if not values:
        return
    if len(values) > MAX_TICKS:
        picks = np.unique(np.linspace(0, len(values) - 1, MAX_TICKS).round().astype(int))
        values = [values[i] for i in picks]
    ax.set_xticks(values, [f"{v:g}" for v in values])


def floor_label(notes: pd.Series) -> str:
    """What a floor band is, from its rows' ``note``: ``split-half floor``, ``random-direction
    floor``, ``random-subspace floor`` or ``noise floor``."""
    text = " ".join(str(n) for n in notes.dropna().unique())
    if text.startswith("split-half"):
        return "split-half floor"
    if text.startswith("random subspaces"):
        return "random-subspace floor"
    if text.startswith("random"):
        return "random-direction floor"
    return "noise floor"


def draw_floor(
    ax: Axes, floors: Mapping[str, pd.DataFrame], *, layer_of: Mapping[str, int | None]
) -> int:
    """Shade each run's noise floor (rows of source :data:`FLOOR`: ``ci_low``–``ci_high`` is the
    floor's 2.5–97.5 percentile band) vs step, in the run's colour, hatched per carrier
    (:data:`HATCHES`), and labelled with what
    it is (``split-half floor`` or ``random-direction floor``, then run and carrier where several).
    Rows at the run's ``layer_of`` where there are some, else the per-step mean of the bands over
    layers.

    Returns:
        The number of bands drawn.
    """
    several = len(floors) > 1
    drawn = 0
    for index, (label, rows) in enumerate(floors.items()):
        if rows.empty:
            continue
        layer = layer_of.get(label)
        if layer is not None and rows["layer"].eq(layer).any():
            rows = rows[rows["layer"].eq(layer)]
        carriers = list(rows["carrier"].dropna().unique())
        for number, (carrier, part) in enumerate(rows.groupby("carrier", dropna=False, sort=True)):
            band = part.groupby("step")[["ci_low", "ci_high"]].mean().sort_index()
            steps = band.index.to_numpy(dtype=float)
            low, high = band["ci_low"].to_numpy(dtype=float), band["ci_high"].to_numpy(dtype=float)
            finite = np.isfinite(low) & np.isfinite(high)
            if not finite.any():
                continue
            parts = [floor_label(part["note"])]
            if several and label:
                parts.append(label)
            if len(carriers) > 1 and pd.notna(carrier):
                parts.append(DISPLAY.get(str(carrier), str(carrier)))
            colour = run_colour(index)
            ax.fill_between(
                steps,
                low,
                high,
                where=finite,
                facecolor=colour,
                alpha=0.12,
                hatch=HATCHES[number % len(HATCHES)],
                edgecolor=colour,
                linewidth=0,
                label=", ".join(parts),
                zorder=0,
            )
            drawn += 1
    return drawn


def no_data(ax: Axes, message: str) -> None:
    """Write ``message`` in the middle of an empty panel (and hide its ticks)."""
    ax.text(
        0.5,
        0.5,
        message,
        transform=ax.transAxes,
        ha="center",
        va="center",
        wrap=True,
        fontsize=7.5,
        color="0.35",
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    ax.set_frame_on(False)


def figure_legend(fig: Figure, *, most_columns: int = 4) -> None:
    """One legend for the whole figure, under the panels (so it never covers data): every
    labelled line of every panel, each label once, in drawing order, in as many columns (at most
    ``most_columns``) as fit the figure's width; last, :data:`BANDS_OMITTED` where a panel left
    out its CI bands."""
    seen: dict[str, Artist] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if any(ax in _OMITTED for ax in fig.axes):
        seen[BANDS_OMITTED] = Patch(visible=False)
    if seen:
        fig.legend(
            list(seen.values()),
            list(seen),
            loc="outside lower center",
            ncols=max(1, min(most_columns, len(seen), _fitting_columns(fig, list(seen)))),
        )


def _fitting_columns(fig: Figure, labels: Sequence[str]) -> int:
    """How many legend columns of the longest label fit the figure's width."""
    import matplotlib as mpl

    size = mpl.font_manager.FontProperties(
        size=mpl.rcParams["legend.fontsize"]
    ).get_size_in_points()
    char = 0.55 * size  # average glyph width of the sans-serif font, points
    handle = (mpl.rcParams["legend.handlelength"] + 2.5) * size
    column = max(len(label) for label in labels) * char + handle
    return int(fig.get_figwidth() * 72 * 0.95 // column)
