"""Figures of metrics against training step: behaviour (1), H/R coupling (3), subspace angles (4)
and coordinate statistics (6)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from safegeom.plots.data import (
    Tables,
    as_tables,
    at_carrier_layer,
    carrier_layer,
    draw_floor,
    draw_lines,
    figure_legend,
    no_data,
    select,
    step_ticks,
    without_floor,
)
from safegeom.plots.style import new_figure, run_colour, style
from safegeom.plots.transfer import has_transfer, transfer_panel

__all__ = [
    "finish_figure",
    "line_panel",
    "plot_behaviour",
    "plot_coordinates",
    "plot_coupling",
    "plot_subspace",
]

STEP = "training step"
_COUPLING = "coupling (|cos| or mean cos², unitless)"


def line_panel(
    ax: Axes,
    named: dict[str, pd.DataFrame],
    metric: str,
    *,
    title: str,
    ylabel: str,
    carrier: str | Sequence[str] | None = None,
    source: str | Sequence[str] | None = None,
    missing: str = "",
    ylim: tuple[float | None, float | None] | None = None,
    always: Sequence[str] = (),
    suffix: str = "",
) -> bool:
    """One panel of ``metric`` vs step for every run (at the carrier's layer, see
    :func:`~safegeom.plots.data.at_carrier_layer`); an empty panel says what is missing. The
    metric's noise-floor rows (source ``floor``) are a shaded band
    (:func:`~safegeom.plots.data.draw_floor`), never a line. Rows measured against anchors
    (``safegeom audit --anchor``) are drawn as one line per anchor; the floor band is the base's.
    ``always`` and ``suffix`` go to :func:`~safegeom.plots.data.draw_lines` (legend labels that
    stay distinct in the figure's one legend).

    Returns:
        Whether anything was drawn.
    """
    picked, floors, layers, notes = {}, {}, {}, set()
    for label, table in named.items():
        rows = select(table, metric, carrier=carrier, source=source, anchor=None)
        layers[label] = carrier_layer(table)
        floors[label] = select(rows, metric, source="floor")
        rows, note = at_carrier_layer(without_floor(rows), layers[label])
        picked[label] = rows
        notes.add(note)
    ax.set_title(title)
    if not draw_lines(ax, picked, always=always, suffix=suffix):
        no_data(ax, f"no {metric} rows in this audit" + (f"\n({missing})" if missing else ""))
        return False
    if draw_floor(ax, floors, layer_of=layers):
        step_ticks(ax, [rows["step"] for rows in [*picked.values(), *floors.values()]])
    note = " ".join(sorted(n for n in notes if n))
    ax.set_xlabel(STEP + (f"\n{note}" if note else ""))
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    return True


def finish_figure(fig: Figure, title: str, drawn: Sequence[bool]) -> Figure:
    """Title ``fig`` (adding ": no data in this audit" where no panel drew) and give it one
    legend under the panels (:func:`~safegeom.plots.data.figure_legend`).

    Returns:
        ``fig``.
    """
    if not any(drawn):
        title += ": no data in this audit"
    fig.suptitle(title)
    figure_legend(fig)
    return fig


def plot_behaviour(tables: Tables) -> Figure:
    """Figure 1: ASR, over-refusal and utility vs step, with 95% CI bands.

    Utility is the task accuracy on the trajectory task's held-out problems where the audits
    have it, else the cross-entropy of held-out reference answers (``cross_entropy``).

    One line per run and prompt set (and judge where runs use several). A table without
    behaviour rows (a ``--no-generate`` audit) gives panels that say so. Where an audit replayed
    attack sets (``audit --attacks``), a fourth panel shows their ASR beside the clean ASR
    (:func:`~safegeom.plots.transfer.transfer_panel`).

    Returns:
        The figure (three panels, or four with attack rows).
    """
    named = as_tables(tables)
    with style():
        transfer = has_transfer(named)
        fig = new_figure(1, 3 + transfer, height=3.1)
        a, b, c = fig.axes[:3]
        drawn = [
            line_panel(
                a,
                named,
                "asr",
                title="ASR, held-out harmful",
                ylabel="ASR (fraction of prompts)",
                ylim=(-0.03, 1.03),
                missing="generation was off: --no-generate",
                always=["prompts"],
            ),
            line_panel(
                b,
                named,
                "over_refusal",
                title="over-refusal, held-out harmless",
                ylabel="refusal rate (fraction)",
                ylim=(-0.03, 1.03),
                missing="generation was off: --no-generate",
                always=["prompts"],
            ),
            _utility_panel(c, named),
        ]
        if transfer:
            drawn.append(transfer_panel(fig.axes[3], named))
        return finish_figure(fig, "Behaviour across fine-tuning", drawn)


def _utility_panel(ax: Axes, named: dict[str, pd.DataFrame]) -> bool:
    """Task accuracy where an audit has it, else the cross-entropy of held-out answers."""
    if any(select(t, "task_accuracy").shape[0] for t in named.values()):
        return line_panel(
            ax,
            named,
            "task_accuracy",
            title="utility: task accuracy",
            ylabel="exact-match accuracy (fraction)",
            ylim=(-0.03, 1.03),
            always=["prompts"],
        )
    return line_panel(
        ax,
        named,
        "cross_entropy",
        title="utility: held-out answers",
        ylabel="cross-entropy (nats per token)",
        always=["prompts"],
        missing="no task with held-out problems, no completion sets",
    )


def _layer_profile(
    ax: Axes, named: dict[str, pd.DataFrame], metric: str, carrier: str, title: str, ylabel: str
) -> bool:
    """``metric`` per layer at each run's first and last checkpoint; whether anything was drawn."""
    ax.set_title(f"{title} per layer: first vs last checkpoint")
    drawn = False
    for index, (label, table) in enumerate(named.items()):
        rows = select(table, metric, carrier=carrier, per_layer=True)
        if rows.empty:
            continue
        rows = without_floor(rows)
        if rows["source"].eq("reextracted").any():
            rows = rows[rows["source"].eq("reextracted")]
        first, last = rows["step"].min(), rows["step"].max()
        looks = ((first, ":", "x"), (last, "-.", "D")) if first != last else ((last, "-.", "D"),)
        for step, dash, marker in looks:  # styles the line panels' variants do not use first
            part = rows[rows["step"] == step].groupby("layer")["value"].mean().sort_index()
            name = ", ".join(p for p in (label, f"step {step}") if p)
            ax.plot(
                part.index.to_numpy(dtype=float),
                part.to_numpy(dtype=float),
                color=run_colour(index),
                linestyle=dash,
                marker=marker,
                label=name,
            )
            drawn = True
    if not drawn:
        no_data(ax, f"no per-layer {metric} rows in this audit")
        return False
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    return True


def plot_coupling(tables: Tables) -> Figure:
    """Figure 3: H/R coupling vs step at the carrier layer (carrier ``hr``: directions
    |cos(h, r)|; ``hr-cone``: mean cos² between h and the cone), and the per-layer profile of the
    direction coupling at each run's first and last step.

    Returns:
        The figure (two panels).
    """
    named = as_tables(tables)
    with style():
        fig = new_figure(1, 2, height=2.9)
        a, b = fig.axes
        drawn = [
            line_panel(
                a,
                named,
                "hr_coupling",
                title="H/R coupling at the carrier layer",
                ylabel=_COUPLING,
                ylim=(0.0, None),
            ),
            _layer_profile(b, named, "hr_coupling", "hr", "|cos(h, r)|", "|cos(h, r)| (unitless)"),
        ]
        return finish_figure(fig, "Coupling of harmfulness and refusal across fine-tuning", drawn)


def plot_subspace(tables: Tables) -> Figure:
    """Figure 4: largest principal angle and Grassmann distance between the base's cone B₀ and
    the checkpoint's B_t vs step.

    Returns:
        The figure (two panels).
    """
    named = as_tables(tables)
    with style():
        fig = new_figure(1, 2, height=2.9)
        a, b = fig.axes
        drawn = [
            line_panel(
                a,
                named,
                "principal_angle_max",
                title=r"largest principal angle, $B_0$ vs $B_t$",
                ylabel="angle (radians)",
            ),
            line_panel(
                b,
                named,
                "grassmann_distance",
                title=r"Grassmann distance, $B_0$ vs $B_t$",
                ylabel="distance (radians)",
            ),
        ]
        return finish_figure(fig, "Movement of the refusal cone across fine-tuning", drawn)


def plot_coordinates(tables: Tables) -> Figure:
    """Figure 6: coordinate statistics of the base's cone B₀ (source ``fixed``) on each
    checkpoint vs step, at the carrier layer: the per-basis-vector separation (Cohen's d,
    harmful vs harmless) and their imbalance.

    Returns:
        The figure (two panels).
    """
    named = as_tables(tables)
    with style():
        fig = new_figure(1, 2, height=2.9)
        a, b = fig.axes
        drawn = [
            line_panel(
                a,
                named,
                "coordinate_separation",
                title=r"separation per basis vector $b_j$",
                ylabel="Cohen's d (pooled σ units)",
                source="fixed",
            ),
            line_panel(
                b,
                named,
                "coordinate_imbalance",
                title="imbalance across the basis",
                ylabel=r"std of Cohen's d across $j$ (σ units)",
                source="fixed",
                suffix="imbalance",
            ),
        ]
        return finish_figure(fig, "Coordinate statistics of the base's cone", drawn)
