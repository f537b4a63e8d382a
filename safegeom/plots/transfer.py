"""Fixed-source transfer: attack sets replayed along a trajectory (rows of source
``fixed-attack:NAME``, :mod:`safegeom.audit.transfer_rows`).

:func:`transfer_panel` draws the ASR of each attack set vs step beside the clean ASR of the
held-out harmful sets (figure 1 gains it as a fourth panel when an audit has attack rows);
:func:`plot_transfer` is the whole transfer figure: that panel, the attack's target
log-probability and the refusal score on the adversarial prompts.

Example:
    >>> from safegeom.audit.schema import frame
    >>> rows = [{"checkpoint": "base", "step": 0, "metric": "attack_asr", "value": 0.5,
    ...          "source": "fixed-attack:gcg", "prompts": "attack:gcg:advbench:val"}]
    >>> has_transfer({"": frame(rows)}), len(plot_transfer(frame(rows)).axes)
    (True, 3)
"""

from __future__ import annotations

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from safegeom.plots.data import Tables, as_tables, draw_lines, figure_legend, no_data, select
from safegeom.plots.style import new_figure, style

__all__ = ["TRANSFER_METRICS", "has_transfer", "plot_transfer", "transfer_panel"]

TRANSFER_METRICS = ("attack_asr", "attack_target_logprob", "attack_refusal_score")
"""The metrics of the transfer rows."""
_PREFIX = "fixed-attack:"
_STEP = "training step"
_MISSING = "no {metric} rows in this audit\n(safegeom audit --attacks DIR{extra})"


def has_transfer(named: dict[str, pd.DataFrame]) -> bool:
    """Whether any table holds a transfer row (:data:`TRANSFER_METRICS`)."""
    return any(t["metric"].isin(TRANSFER_METRICS).any() for t in named.values())


def _labelled(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``rows`` with ``source`` relabelled for the legend (``attack gcg``, ``no attack, SET``)
    and ``metric`` set to ``metric``, so attack and clean rows draw on one axis."""
    out = rows.copy()
    source = out["source"].astype("string")
    attacked = source.str.startswith(_PREFIX).fillna(False).astype(bool)
    out["source"] = source.where(~attacked, "attack " + source.str.removeprefix(_PREFIX))
    clean = "no attack, " + out["prompts"].astype("string")
    out["source"] = out["source"].where(attacked, clean)
    out["metric"] = metric
    return out


def _panel(
    ax: Axes,
    named: dict[str, pd.DataFrame],
    metric: str,
    *,
    title: str,
    ylabel: str,
    clean: str | None = None,
    extra: str = "",
) -> bool:
    """``metric`` of every attack set vs step (and the clean ``clean`` rows beside it)."""
    picked = {}
    for label, table in named.items():
        rows = select(table, metric)
        if clean is not None:
            plain = select(table, clean)
            rows = pd.concat([rows, plain[plain["source"].isna()]], ignore_index=True)
        picked[label] = _labelled(rows, metric)
    ax.set_title(title)
    if not any(select(t, metric).shape[0] for t in named.values()):
        no_data(ax, _MISSING.format(metric=metric, extra=extra))
        return False
    draw_lines(ax, picked, keys=["source"])
    ax.set_xlabel(_STEP)
    ax.set_ylabel(ylabel)
    return True


def transfer_panel(ax: Axes, named: dict[str, pd.DataFrame]) -> bool:
    """ASR of each attack set vs step beside the clean ASR of the held-out harmful sets.

    Returns:
        Whether anything was drawn (an audit without attack rows: a panel that says so).
    """
    drawn = _panel(
        ax,
        named,
        "attack_asr",
        title="ASR under fixed-source attacks",
        ylabel="ASR (fraction of prompts)",
        clean="asr",
        extra=", with generation",
    )
    if drawn:
        ax.set_ylim(-0.03, 1.03)
    return drawn


def plot_transfer(tables: Tables) -> Figure:
    """The transfer figure: attack ASR beside the clean ASR, the target log-probability, and the
    refusal score on the adversarial prompts, vs step (one colour per run, one line style per
    attack set).

    Returns:
        The figure (three panels); panels without rows say so.
    """
    named = as_tables(tables)
    with style():
        fig = new_figure(1, 3, height=3.1)
        a, b, c = fig.axes
        drawn = [
            transfer_panel(a, named),
            _panel(
                b,
                named,
                "attack_target_logprob",
                title="target log-probability",
                ylabel="log p(target) (nats per token)",
            ),
            _panel(
                c,
                named,
                "attack_refusal_score",
                title="refusal score (adversarial)",
                ylabel="refusal score (log-odds, nats)",
            ),
        ]
        title = "Fixed-source attacks along the trajectory"
        fig.suptitle(title if any(drawn) else f"{title}: no data in this audit")
        figure_legend(fig)
        return fig
