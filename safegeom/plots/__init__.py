"""Paper figures of a checkpoint-trajectory audit: pure functions, audit tables in, ``Figure`` out.

Each function takes one audit table (a DataFrame with :data:`safegeom.audit.schema.COLUMNS`, e.g.
``load_audit(DIR).table``) or several keyed by run label (overlaid on the same axes, one colour
per run), and returns a :class:`matplotlib.figure.Figure`. Nothing is written and nothing touches
pyplot's global state; save with ``fig.savefig(path)`` (``safegeom figures`` does that through the
artifact layer). One style for all (:mod:`safegeom.plots.style`): Okabe–Ito colours, line styles
and markers for variants so nothing depends on colour alone, fonts readable at 7 in wide.

Noise floors (rows of source ``floor``) are shaded, hatched bands labelled with what they are
(split-half or random-direction floor), never lines; ticks sit at the checkpoints' steps; a
single run's legend entries carry no run label.

Missing metrics never raise: a panel whose rows are absent (a ``--no-generate`` audit has no
behaviour rows) says so in its text, and a figure with no data at all says so in its title.
:func:`has_data` tells which figures a table can fill; ``safegeom figures`` skips the others with
a printed note.

============ ====================== ===================================================
figure       function               metrics
============ ====================== ===================================================
1 behaviour  :func:`plot_behaviour` asr, over_refusal, task_accuracy or cross_entropy
2 drift      :func:`plot_drift`     per-layer cosine_to_base (or direction_drift)
3 coupling   :func:`plot_coupling`  hr_coupling (carrier layer and per layer)
4 subspace   :func:`plot_subspace`  principal_angle_max, grassmann_distance
5 causal     :func:`plot_causal`    ablation/addition _raw, _control_mean/_std, _effect, _base
6 coords     :func:`plot_coordinates` coordinate_separation, coordinate_imbalance
8 interfer.  :func:`plot_interference` interference_grad_resid, _grad_weights, _cone_share
9 anchors    :func:`plot_anchors`   cosine_to_base, hr_coupling against every anchor
============ ====================== ===================================================

An audit measured against anchors (``safegeom audit --anchor NAME=MODEL``) draws one line per
anchor in the line panels (figures 3, 4 and 6) and gets figure 9; an audit without anchors has no
figure 9.

An audit that replayed attack sets (``safegeom audit --attacks DIR``) gives figure 1 a fourth
panel, the ASR of each attack set beside the clean ASR; :func:`plot_transfer` draws the whole
transfer view (ASR, target log-probability, refusal score on the adversarial prompts).

Example:
    >>> from safegeom.audit.schema import frame
    >>> table = frame([{"checkpoint": "base", "step": 0, "metric": "asr", "value": 0.1}])
    >>> type(plot_behaviour({"LoRA": table})).__name__
    'Figure'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from matplotlib.figure import Figure

from safegeom.plots.anchors import anchor_names, plot_anchors
from safegeom.plots.causal import plot_causal
from safegeom.plots.data import Tables, as_tables
from safegeom.plots.heatmap import drift_matrix, plot_drift
from safegeom.plots.interference import plot_interference
from safegeom.plots.lines import plot_behaviour, plot_coordinates, plot_coupling, plot_subspace
from safegeom.plots.style import PALETTE, STYLE, style
from safegeom.plots.transfer import plot_transfer

__all__ = [
    "FIGURES",
    "PALETTE",
    "STYLE",
    "FigureSpec",
    "Tables",
    "drift_matrix",
    "has_data",
    "plot_anchors",
    "plot_behaviour",
    "plot_causal",
    "plot_coordinates",
    "plot_coupling",
    "plot_drift",
    "plot_interference",
    "plot_subspace",
    "plot_transfer",
    "style",
]


@dataclass(frozen=True)
class FigureSpec:
    """One paper figure: its file stem, what it shows, its function and the metrics it needs."""

    name: str
    """File stem (``fig1_behaviour``)."""
    what: str
    """One line: what the figure shows."""
    plot: Callable[[Tables], Figure]
    """The plot function."""
    metrics: tuple[str, ...]
    """The figure has data when a table holds a row of any of these."""
    missing: str = ""
    """Why an audit may lack them (said when the figure is skipped)."""
    anchored: bool = False
    """The figure needs rows measured against an anchor besides the base (``--anchor``)."""


FIGURES: dict[str, FigureSpec] = {
    spec.name: spec
    for spec in (
        FigureSpec(
            "fig1_behaviour",
            "ASR, over-refusal and utility vs step, 95% CI bands",
            plot_behaviour,
            ("asr", "over_refusal", "task_accuracy", "cross_entropy"),
            "a --no-generate audit has no behaviour",
        ),
        FigureSpec(
            "fig2_drift",
            "cosine to base of refusal and harmfulness, step × layer",
            plot_drift,
            ("cosine_to_base",),
        ),
        FigureSpec(
            "fig3_coupling", "H/R coupling vs step and per layer", plot_coupling, ("hr_coupling",)
        ),
        FigureSpec(
            "fig4_subspace",
            "principal angle and Grassmann distance of the cone vs step",
            plot_subspace,
            ("principal_angle_max", "grassmann_distance"),
        ),
        FigureSpec(
            "fig5_causal",
            "fixed-source ablation/addition effects vs random controls, un-intervened score",
            plot_causal,
            ("ablation_raw", "addition_raw", "ablation_effect", "addition_effect"),
            "the causal family was not run",
        ),
        FigureSpec(
            "fig6_coordinates",
            "coordinate separation per b_j and imbalance vs step",
            plot_coordinates,
            ("coordinate_separation", "coordinate_imbalance"),
        ),
        FigureSpec(
            "fig8_interference",
            "task–safety interference: gradient cosines and the change's share in the cone",
            plot_interference,
            ("interference_grad_resid", "interference_grad_weights", "interference_cone_share"),
            "the audit ran with --no-interference",
        ),
        FigureSpec(
            "fig9_anchors",
            "cosine to each anchor and H/R coupling per anchor vs step, and their summary",
            plot_anchors,
            ("cosine_to_base", "hr_coupling"),
            "the audit has no anchors besides the base (safegeom audit --anchor NAME=MODEL)",
            anchored=True,
        ),
    )
}
"""The figures of ``safegeom figures``, in order."""


def has_data(tables: Tables, name: str) -> bool:
    """Whether any of the tables holds a row the figure ``name`` (a key of :data:`FIGURES`) draws.

    Raises:
        KeyError: ``name`` is not a figure.
    """
    spec = FIGURES[name]
    for table in as_tables(tables).values():
        rows = table[table["metric"].isin(spec.metrics)]
        if not rows.empty and (not spec.anchored or anchor_names(rows)):
            return True
    return False
