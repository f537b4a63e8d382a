"""Figure 7: the defence study (``analyses/defences.py``) — LoRA vs RefusalGuard vs adaptive.

``fig7_defences_<task>``: four panels vs training step, one colour per method (seed 0): held-out
ASR (204 prompts, 95% bootstrap CI), the cosine to the base of the re-extracted refusal
direction, the H/R coupling |cos(h, r)| and the fixed-source ablation effect (the base's r₀
ablated, minus matched random controls, paired-bootstrap CI), the last three at the base's
carrier layer, from ``safegeom audit`` of each trajectory. ``fig7_lambda``: ASR and task accuracy
of RefusalGuard (LoRA variant) on ``mix`` against λ_geom, mean over seeds with 95% CIs.

Reads ``analyses/results/defences.json`` (the audit rows are stored there), so it needs no run
folders. The panels are :func:`safegeom.plots.lines.line_panel` in :mod:`safegeom.plots`' style.

On smol-chat (``--results analyses/results/defences_smol-chat.json``) the files are
``fig7_defences_smol-chat_<task>.png``, and the title and the ASR panel say the model and the
number of held-out prompts.

Usage: python figures/fig7_defences.py [--results analyses/results/defences.json]
    [--tasks mix,sentiment] [--methods lora,rg-lora,rg-reft,adaptive] [--out figures/]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analyses.defences_report import lambda_rows, load_results
from safegeom.audit.schema import frame
from safegeom.figure_files import save_figure
from safegeom.plots.data import figure_legend
from safegeom.plots.lines import line_panel
from safegeom.plots.style import new_figure, run_colour, style

LABELS = {
    "lora": "LoRA",
    "rg-lora": "RefusalGuard (LoRA)",
    "rg-lora-both": "RefusalGuard (LoRA, harmless held)",
    "rg-reft": "RefusalGuard (edit)",
    "adaptive": "adaptive (probe)",
    "kl": "constant KL",
    "sft": "full SFT",
    "safe-lora": "Safe LoRA",
    "lox": "LoX",
}
"""Legend names of the study's methods."""


def run_tables(
    results: Mapping[str, Any], task: str, methods: Sequence[str]
) -> dict[str, pd.DataFrame]:
    """One audit-schema table per method of ``task`` (seed 0): the stored audit rows plus the
    study's own ASR per step (metric ``asr``, prompts ``held-out harmful``).

    Returns:
        Legend label → table (:data:`safegeom.audit.schema.COLUMNS`); methods without a
        trajectory are left out.
    """
    tables = {}
    for method in methods:
        steps = results["trajectories"].get(method, {}).get(task)
        if not steps:
            continue
        rows = [
            {
                "checkpoint": f"step-{r['step']}",
                "step": r["step"],
                "metric": "asr",
                "value": r["asr"],
                "ci_low": r["asr_ci"][0],
                "ci_high": r["asr_ci"][1],
                "prompts": "held-out harmful",
                "judge": "substring",
            }
            for r in steps
        ]
        audit = results["audit"].get(method, {}).get(task)
        table = frame(rows)
        if audit:
            table = pd.concat([table, frame(audit["rows"])], ignore_index=True)
        tables[LABELS.get(method, method)] = table
    return tables


def plot_defences(
    tables: Mapping[str, pd.DataFrame], task: str, model: str = "tiny-chat", n_harmful: int = 204
) -> Figure:
    """The four overlaid panels of one task (module docstring).

    Returns:
        The figure (2 × 2 panels, one legend).
    """
    named = dict(tables)
    with style():
        fig = new_figure(2, 2, height=2.7)
        a, b, c, d = fig.axes
        line_panel(
            a,
            named,
            "asr",
            title=f"ASR, held-out harmful ({n_harmful})",
            ylabel="ASR (fraction)",
            ylim=(-0.03, 1.03),
        )
        line_panel(
            b,
            named,
            "cosine_to_base",
            title="refusal direction: cosine to base",
            ylabel=r"$\cos(r_t, r_0)$ (unitless)",
            carrier="refusal",
            source="reextracted",
            missing="no audit of these runs",
        )
        line_panel(
            c,
            named,
            "hr_coupling",
            title="H/R coupling |cos(h, r)|",
            ylabel="|cos(h, r)| (unitless)",
            carrier="hr",
            source="reextracted",
            missing="no audit",
        )
        line_panel(
            d,
            named,
            "ablation_effect",
            title=r"fixed-source ablation of $r_0$",
            ylabel="effect − controls (log-odds, nats)",
            carrier="refusal",
            source="fixed",
            missing="no audit",
        )
        fig.suptitle(f"Defences on {model}, task {task} (seed 0)")
        figure_legend(fig)
        return fig


def plot_lambda(rows: Sequence[Mapping[str, float]], chosen_lr: float | None = None) -> Figure:
    """ASR and task accuracy of rg-lora on ``mix`` vs λ_geom (:func:`lambda_rows` output).

    Returns:
        The figure (two panels; λ on a symmetric-log axis so 0 shows).
    """
    with style():
        fig = new_figure(1, 2, height=2.8)
        lams = [r["lambda"] for r in rows]
        for ax, (key, lo, hi, title, ylabel) in zip(
            fig.axes,
            (
                ("asr", "asr_low", "asr_high", "held-out ASR", "ASR (fraction of prompts)"),
                (
                    "task_accuracy",
                    "acc_low",
                    "acc_high",
                    "held-out sentiment accuracy",
                    "exact-match accuracy (fraction)",
                ),
            ),
            strict=True,
        ):
            ax.plot(lams, [r[key] for r in rows], color=run_colour(1), marker="o")
            ax.fill_between(
                lams,
                [r[lo] for r in rows],
                [r[hi] for r in rows],
                color=run_colour(1),
                alpha=0.15,
                linewidth=0,
            )
            ax.set_xscale("symlog", linthresh=0.1)
            ax.set_xticks(lams, [f"{lam:g}" for lam in lams])
            ax.set_xlabel("λ_geom (symmetric-log axis)")
            ax.set_ylabel(ylabel)
            ax.set_ylim(-0.03, 1.03)
            ax.set_title(title)
        lr = "" if chosen_lr is None else f", lr {chosen_lr:g}"
        fig.suptitle(f"RefusalGuard (LoRA variant) on mix: λ_geom ablation{lr}")
        return fig


def main(argv: Sequence[str] | None = None) -> int:
    """Write ``fig7_defences_<task>.png`` per task (``fig7_defences_<model>_<task>.png`` for a
    model other than tiny-chat) and ``fig7_lambda.png`` when there is a λ ablation, under
    ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("analyses/results/defences.json"))
    parser.add_argument("--tasks", default="mix,sentiment")
    parser.add_argument("--methods", default="lora,rg-lora,rg-reft,adaptive")
    parser.add_argument("--out", type=Path, default=Path("figures"))
    args = parser.parse_args(argv)
    results = load_results(args.results)
    model = results["protocol"].get("model", "tiny-chat")
    stem = "fig7_defences" if model == "tiny-chat" else f"fig7_defences_{model}"
    n_harmful = _n_harmful(results)
    for task in args.tasks.split(","):
        tables = run_tables(results, task, args.methods.split(","))
        fig = plot_defences(tables, task, model, n_harmful)
        print(save_figure(fig, args.out / f"{stem}_{task}.png"))
    if results["lambda"]:
        fig = plot_lambda(lambda_rows(results), results["chosen_lr"].get("rg-lora"))
        print(save_figure(fig, args.out / "fig7_lambda.png"))
    return 0


def _n_harmful(results: Mapping[str, Any]) -> int:
    """Held-out harmful prompts behind the ASR (the base's per-prompt list on the first task)."""
    for numbers in results["base"].values():
        if numbers.get("asr"):
            return int(numbers["asr"]["n_prompts"])
    return 204


if __name__ == "__main__":
    raise SystemExit(main())
