"""Figure 8: task–safety interference vs step (:mod:`safegeom.audit.interference`), beside the
drift (figure 2) and coupling (figure 3) it completes: gradient interference in the residual
stream and in the weights, and the share of the activation change inside the base's cone."""

from __future__ import annotations

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from safegeom.plots.data import Tables, as_tables
from safegeom.plots.lines import finish_figure, line_panel
from safegeom.plots.style import new_figure, style

__all__ = ["plot_interference"]

_COSINE = r"cos$(-\nabla L_{task}, \nabla s)$ (unitless)"
_NO_TASK = "the audit knew no task: audit a run folder, or pass --task"


def _zero(ax: Axes, drawn: bool) -> bool:
    """A thin line at 0 (no interference) on a drawn cosine panel."""
    if drawn:
        ax.axhline(0.0, color="0.5", linewidth=0.6, zorder=0)
    return drawn


def plot_interference(tables: Tables) -> Figure:
    """Figure 8: the cosine between the task's descent direction and the gradient of the harmful
    refusal score, w.r.t. the residual stream at the carrier layer and w.r.t. the decoder
    blocks' weights (below 0: a task step lowers refusal), and the share of the activation
    change on harmful prompts inside the base's cone B₀, each vs step with its bootstrap CI and
    its floor (random directions, random subspaces) as a hatched band.

    Returns:
        The figure (three panels; a panel without rows says why).

    Example:
        >>> from safegeom.audit.schema import frame
        >>> row = {"checkpoint": "base", "step": 0, "metric": "interference_grad_weights"}
        >>> len(plot_interference(frame([{**row, "value": -0.1}])).axes)
        3
    """
    named = as_tables(tables)
    with style():
        fig = new_figure(1, 3, height=2.9)
        a, b, c = fig.axes
        drawn = [
            _zero(
                a,
                line_panel(
                    a,
                    named,
                    "interference_grad_resid",
                    title="gradients: residual stream",
                    ylabel=_COSINE,
                    missing=_NO_TASK,
                ),
            ),
            _zero(
                b,
                line_panel(
                    b,
                    named,
                    "interference_grad_weights",
                    title="gradients: block weights",
                    ylabel=_COSINE,
                    missing=_NO_TASK,
                ),
            ),
            line_panel(
                c,
                named,
                "interference_cone_share",
                title=r"share of $\Delta h$ inside $B_0$",
                ylabel=r"$\|P_{B_0}\Delta h\|^2 / \|\Delta h\|^2$ (fraction)",
                missing="no checkpoint differs from the base",
                ylim=(0.0, None),
            ),
        ]
        return finish_figure(fig, "Task–safety interference across fine-tuning", drawn)
