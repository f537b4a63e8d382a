"""The SFT-vs-R2D2 study's outputs: the JSON, the markdown results file and the figure, all
computed from :func:`analyses.adversarial.run_study`'s tables (nothing typed in by hand).

Example (not a doctest: it needs a finished study)::

    write_outputs(study, early=None, json_path=Path("a.json"), md_path=Path("a.md"),
                  figure=Path("a.png"))
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from analyses.adversarial_claims import (
    SATURATED,
    XSTEST_SAFE,
    Claim,
    Estimate,
    estimate,
    judge_claims,
)
from safegeom.artifacts import write_text
from safegeom.figure_files import save_figure

__all__ = [
    "LABELS",
    "UTILITY",
    "claims_by_seed",
    "limits",
    "peak_step",
    "plot_study",
    "render_markdown",
    "write_outputs",
]

UTILITY = "cross_entropy:gsm8k:test"
"""The utility quantity: the cross-entropy of GSM8K test answers (nats per token; lower is
better). The audit's only reference-answer set: Alpaca ships without answers."""
LABELS: Mapping[str, str] = {"sft": "SFT", "r2d2": "R2D2"}
"""Recipe → its label in tables and the figure."""


def early_late(steps: Sequence[int], early: int | None) -> tuple[int, int]:
    """``(E, L)``: ``early`` (default the first step after the base) and the last step.

    Returns:
        The two steps.
    """
    later = [s for s in steps if s > 0]
    return (later[0] if early is None else early), later[-1]


def claims_by_seed(study: Mapping[str, Any], early: int | None) -> dict[int, list[Claim]]:
    """Claims (a), (b), (c) of every seed.

    Returns:
        Seed → its three :class:`~analyses.adversarial_claims.Claim`.
    """
    e, last = early_late(study["steps"], early)
    attacks = list(study["attacks"])
    return {
        seed: judge_claims(study["rows"], seed, e, last, attacks, UTILITY)
        for seed in study["seeds"]
    }


def peak_step(study: Mapping[str, Any]) -> int:
    """The checkpoint (after the base) where the first seed's R2D2 coupling (against the base)
    is highest: the second reading's ``E``, chosen after the run.

    Returns:
        That step.
    """
    first, later = study["seeds"][0], [s for s in study["steps"] if s > 0]
    found = {step: estimate(study["rows"], "r2d2", first, step, "coupling") for step in later}
    return max(later, key=lambda step: -1.0 if found[step] is None else found[step].value)


def _cell(rows: pd.DataFrame, recipe: str, seed: int, step: int, quantity: str) -> str:
    found: Estimate | None = estimate(rows, recipe, seed, step, quantity)
    return "–" if found is None else found.text()


_TRAJECTORY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("coupling", "H/R coupling |cos(h,r)|"),
    ("attack_asr:gcg", "GCG ASR"),
    ("attack_asr:autodan", "AutoDAN ASR"),
    ("attack_asr:prefill", "prefill ASR"),
    ("asr:advbench:test", "clean ASR advbench"),
    (f"over_refusal:{XSTEST_SAFE}", "XSTest-safe over-refusal"),
    ("over_refusal:alpaca:test", "Alpaca over-refusal"),
    (UTILITY, "GSM8K CE (nats/token)"),
    ("kl_to_base", "KL to base (nats)"),
    ("drift", "cos(r_t, r_0)"),
    ("ablation_effect", "ablation effect of r_0 (nats)"),
)


def _trajectory_table(rows: pd.DataFrame, seed: int, steps: Sequence[int]) -> list[str]:
    head = "| recipe | step | " + " | ".join(label for _, label in _TRAJECTORY_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(_TRAJECTORY_COLUMNS) + 2)]
    for recipe, label in LABELS.items():
        for step in steps:
            cells = [_cell(rows, recipe, seed, step, q) for q, _ in _TRAJECTORY_COLUMNS]
            lines.append(f"| {label} | {step} | " + " | ".join(cells) + " |")
    return lines


def _anchor_lines(rows: pd.DataFrame, seeds: Sequence[int], last: int) -> list[str]:
    """The final checkpoints' coupling and drift against every anchor."""
    lines = [
        "| recipe | seed | anchor | H/R coupling | cos(r_L, anchor's r) |",
        "|---|---|---|---|---|",
    ]
    for recipe, label in LABELS.items():
        for seed in seeds:
            picked = rows[
                rows["recipe"].eq(recipe)
                & rows["seed"].eq(seed)
                & rows["step"].eq(last)
                & rows["quantity"].isin(["coupling", "drift"])
            ]
            for anchor in dict.fromkeys(picked["anchor"].dropna()):
                cells = []
                for quantity in ("coupling", "drift"):
                    one = picked[picked["quantity"].eq(quantity) & picked["anchor"].eq(anchor)]
                    cells.append(
                        "–"
                        if one.empty
                        else Estimate(*one[["value", "ci_low", "ci_high"]].iloc[0]).text()
                    )
                lines.append(f"| {label} | {seed} | {anchor} | " + " | ".join(cells) + " |")
    return lines


def _pool_lines(pool: Mapping[int, Sequence[Mapping[str, float]]]) -> list[str]:
    """R2D2's manifest terms at the checkpoint steps, every seed."""
    names = ("pool_asr", "pool_loss", "attack", "away", "toward", "utility")
    lines = [
        "The pool's ASR and mean target loss (nats per token) on the model each step attacked, "
        "the sampled test cases' loss after the step's GCG, and the three loss terms.",
        "",
        "| seed | step | " + " | ".join(names) + " |",
        "|" + "---|" * (len(names) + 2),
    ]
    for seed, entries in pool.items():
        for e in entries:
            cells = [f"{e[n]:.3f}" if n in e else "–" for n in names]
            lines.append(f"| {seed} | {int(e['step'])} | " + " | ".join(cells) + " |")
    return lines


def _claim_lines(claims: Mapping[int, list[Claim]], seeds: Sequence[int]) -> list[str]:
    """Each claim: its verdict per seed, and a table of its parts with the first seed's numbers
    and every seed's verdict."""
    first = seeds[0]
    lines: list[str] = []
    for index, claim in enumerate(claims[first]):
        others = ", ".join(f"seed {s}: **{claims[s][index].verdict}**" for s in seeds[1:])
        lines += [
            f"### ({claim.key}) {claim.text}",
            "",
            f"Seed {first}: **{claim.verdict}**" + (f" ({others})" if others else "") + ".",
            "",
            f"| part | left (seed {first}) | right (seed {first}) | "
            + " | ".join(f"seed {s}" for s in seeds)
            + " |",
            "|---|---|---|" + "---|" * len(seeds),
        ]
        for k, part in enumerate(claim.parts):
            verdicts = " | ".join(claims[s][index].parts[k]["verdict"] for s in seeds)
            lines.append(f"| {part['what']} | {part['left']} | {part['right']} | {verdicts} |")
        lines.append("")
    return lines


def render_markdown(
    study: Mapping[str, Any],
    claims: Mapping[int, list[Claim]],
    early: int | None,
    figure: Path,
    at_peak: tuple[int, Mapping[int, list[Claim]]] | None = None,
) -> str:
    """The results file (``at_peak``: the second reading's ``E`` and its claims, when it differs
    from the first's).

    Returns:
        Markdown text.
    """
    rows, seeds, settings = study["rows"], study["seeds"], study["settings"]
    e, last = early_late(study["steps"], early)
    timings = ", ".join(f"{k} {v / 60:.1f} min" for k, v in study["timings"].items())
    attacks = ", ".join(f"{n} {v:.3f}" for n, v in study["attacks"].items())
    s = settings
    model = study.get("model", "tiny-chat")
    source = f"`{model}`" + (
        "" if model == "tiny-chat" else " (its safety adapter merged into its base first)"
    )
    anchors = (
        "the base and the final checkpoints of the recipe's other seeds"
        if len(seeds) > 1
        else "the base alone (one seed, so no other seed's final checkpoint)"
    )
    out = [
        f"# SFT vs R2D2 on {model} (issue 24, item 3)",
        "",
        "Written by `analyses/adversarial.py`"
        + (
            " with `--quick` (smoke-test sizes: not the study's numbers)"
            if study.get("quick")
            else ""
        )
        + f"; seeds {', '.join(map(str, seeds))}; one thread; time spent computing (summed over the "
        f"items, as each was computed): {timings}.",
        "",
        "## Protocol",
        "",
        f"- Both recipes: LoRA from {source}, {s.steps} steps, lr {s.lr:g} (cosine), a "
        f"checkpoint every {s.save_every} steps; the first {s.n_behaviours} `harmbench-train` "
        f'behaviours with the refusal "Sorry, I can\'t do that.", the first {s.n_utility} '
        f"`alpaca:train` instructions answered by the base itself ({s.answer_tokens} tokens, greedy).",
        f"- R2D2 (`safegeom train r2d2`): {s.attacked} behaviours a step, each advanced by "
        f"{s.r2d2_gcg_steps} GCG step(s) of {s.r2d2_width} candidates on a {s.suffix_tokens}-token "
        f"suffix, 20% of the pool reset every {s.reset_every} steps, utility batch {s.batch}, "
        "loss 0.5 away + 0.5 toward + 1 utility.",
        f"- SFT (`safegeom train lora`): the same behaviours with the same refusal (no suffix) and "
        f"the same utility rows in one task, batch {s.batch + s.attacked} (behaviours : utility = "
        f"{s.n_behaviours} : {s.n_utility} = {s.attacked} : {s.batch}).",
        f"- Fixed-source attack sets, made once on the base on the first {s.n_attack} "
        f"`harmbench:val` behaviours (never trained on): GCG ({s.gcg_tokens} tokens, "
        f"{s.gcg_steps} steps of {s.gcg_width}), AutoDAN-style (population "
        f"{s.autodan_population}, {s.autodan_generations} generations), prefilling. Success on "
        f"the base (substring judge, {s.attack_tokens} tokens): {attacks}.",
        f"- Audit (`safegeom.audit.audit`) of every checkpoint of every run: {s.n_behaviour} "
        f"prompts per held-out set, {s.n_per_class} carrier prompts per class, {s.n_val} "
        f"validation prompts, {s.n_resamples} bootstrap resamples (95% CIs in brackets), the "
        f"attack sets replayed, anchors: {anchors}. Coupling is `hr_coupling` of the checkpoint's own h and r at the base's carrier "
        "layer; utility is the cross-entropy of GSM8K test answers (lower is better).",
        f"- Claims: E = step {e} (the first checkpoint after the base, declared before the run; a "
        f"second reading takes E at R2D2's coupling peak), L = step {last} (the last). A part "
        "*appears* when the two CIs are disjoint in the finding's direction, *does not appear* "
        "when disjoint the other way, else *cannot tell (CI overlaps)*; a claim appears when "
        f"every part does. Saturated over-refusal: CI at or above {SATURATED:g}.",
        "",
        f"![SFT vs R2D2]({Path('../..') / figure})",
        "",
        f"## Claims at E = step {e}, declared before the run",
        "",
        *_claim_lines(claims, seeds),
    ]
    if at_peak is not None:
        peak, peak_claims = at_peak
        out += [
            f"## Claims at E = step {peak}, R2D2's coupling peak",
            "",
            f"Chosen after the run: step {peak} is where seed {seeds[0]}'s R2D2 coupling is "
            f"highest, so seed {seeds[0]}'s verdicts here are selected on its data; the other "
            "seeds test the choice.",
            "",
            *_claim_lines(peak_claims, seeds),
        ]
    out += [
        f"## Trajectories (seed {seeds[0]})",
        "",
        *_trajectory_table(rows, seeds[0], study["steps"]),
        "",
        f"## Every seed at step {last}",
        "",
    ]
    head = "| recipe | seed | " + " | ".join(label for _, label in _TRAJECTORY_COLUMNS) + " |"
    out += [head, "|" + "---|" * (len(_TRAJECTORY_COLUMNS) + 2)]
    for recipe, label in LABELS.items():
        for seed in seeds:
            cells = [_cell(rows, recipe, seed, last, q) for q, _ in _TRAJECTORY_COLUMNS]
            out.append(f"| {label} | {seed} | " + " | ".join(cells) + " |")
    out += ["", f"## Against the anchors at step {last}", "", *_anchor_lines(rows, seeds, last)]
    out += ["", "## R2D2's own pool (the training manifest)", "", *_pool_lines(study["pool"])]
    out += ["", f"## What {model} limits", "", *limits(study), ""]
    return "\n".join(out)


def limits(study: Mapping[str, Any]) -> list[str]:
    """What on the study's model limits the reading, with the study's own numbers (the base's
    coupling and utility, the set sizes, R2D2's pool ASR).

    Returns:
        Markdown bullet lines.
    """
    rows, s, first = study["rows"], study["settings"], study["seeds"][0]
    coupling = estimate(rows, "r2d2", first, 0, "coupling")
    utility = estimate(rows, "r2d2", first, 0, UTILITY)
    pool = [e["pool_asr"] for entries in study["pool"].values() for e in entries]
    worst = max(pool, default=float("nan"))
    attack = _attack_limit(s, worst)
    if study.get("model", "tiny-chat") != "tiny-chat":
        return _scale_limits(study, attack)
    return [
        "- `tiny-chat` is a 4.7M-parameter model trained from scratch on templated refusals and "
        "answers (its model card): it reads surface form. The AutoDAN-style templates and "
        "prefilling succeed on the base because its refusal keys on the request's words and the "
        "first answer tokens, not because an optimiser found a weakness; training that moves "
        "those first tokens moves those numbers directly.",
        "- Its H/R coupling at the base is small (|cos(h, r)| "
        + ("–" if coupling is None else coupling.text())
        + " at the carrier layer), so high and low coupling are differences of a few tenths "
        "or less against bootstrap CIs over "
        f"{s.n_per_class} carrier prompts a class.",
        "- The utility is the cross-entropy of GSM8K test answers, which tiny-chat models poorly "
        "even at the base ("
        + ("–" if utility is None else utility.text())
        + " nats per token); Alpaca ships without reference answers, so the audit has no second "
        f"utility set. Each held-out set, XSTest's safe prompts included, is judged on "
        f"{s.n_behaviour} prompts, and each attack set holds {s.n_attack} behaviours: the ASR "
        "and over-refusal CIs are wide.",
        attack,
    ]


def _attack_limit(s: Any, worst: float) -> str:
    """The bullet on R2D2's CPU-sized attack (``worst``: its pool's highest ASR at a
    checkpoint)."""
    return (
        f"- R2D2's attack is CPU-sized ({s.r2d2_gcg_steps} GCG step(s) of {s.r2d2_width} "
        f"candidates per training step, {s.attacked} of {s.n_behaviours} test cases a step): its "
        f"own pool's ASR is at most {worst:.3f} at the checkpoints"
        + (
            ", so the pool never catches up with the model and the dynamic part of the defence "
            "is weak"
            if worst < 0.25
            else ""
        )
        + "; HarmBench's R2D2 uses 5 steps of 512."
    )


def _scale_limits(study: Mapping[str, Any], attack: str) -> list[str]:
    """The limits of a study on a real model cut to CPU scale (``smol-chat``): one seed, short
    runs, small sets, weak attacks."""
    rows, s, seeds = study["rows"], study["settings"], study["seeds"]
    coupling = estimate(rows, "r2d2", seeds[0], 0, "coupling")
    attacks = ", ".join(f"{n} {v:.3f}" for n, v in study["attacks"].items())
    return [
        f"- `{study.get('model')}` is SmolLM2-135M-Instruct with the project's safety LoRA "
        "(its model card: high over-refusal, far from its base in KL); the study runs at the "
        f"scale one CPU thread allows: {s.steps} steps, {s.n_behaviours} training behaviours, "
        f"{s.n_utility} utility rows, seed{'s' if len(seeds) > 1 else ''} "
        f"{', '.join(map(str, seeds))}"
        + (
            " only, so nothing here says how much a verdict varies with the seed and the "
            "anchors are the base alone"
            if len(seeds) == 1
            else ""
        )
        + ".",
        "- The H/R coupling at the base is "
        + ("–" if coupling is None else coupling.text())
        + f" at the carrier layer, from {s.n_per_class} carrier prompts a class; the base's "
        f"direction is selected on {s.n_val} validation prompts a class.",
        f"- Each held-out set is judged on {s.n_behaviour} prompts and each attack set holds "
        f"{s.n_attack} `harmbench:val` behaviours, attacked on the base with small budgets (GCG "
        f"{s.gcg_steps} steps of {s.gcg_width} on {s.gcg_tokens} tokens; AutoDAN-style "
        f"{s.autodan_population} x {s.autodan_generations}); success on the base: {attacks}. "
        "One behaviour moves an ASR by "
        f"{1 / s.n_attack:.3f}, and the CIs are wide.",
        attack,
    ]


def plot_study(tables: Mapping[str, pd.DataFrame], model: str = "tiny-chat") -> Figure:
    """Coupling, fixed-source ASR, XSTest-safe over-refusal and utility against step, one colour
    per recipe (through :mod:`safegeom.plots`' panels and style).

    Args:
        tables: recipe label → its audit table.
        model: The study's model, named in the title.

    Returns:
        The figure (2 × 2 panels).
    """
    from safegeom.plots.lines import finish_figure, line_panel
    from safegeom.plots.style import new_figure, style
    from safegeom.plots.transfer import transfer_panel

    base_only = {k: t[t["anchor"].isna() | t["anchor"].eq("base")] for k, t in tables.items()}
    attack_only = {k: t[t["metric"].eq("attack_asr")] for k, t in tables.items()}
    safe_only = {k: t[t["prompts"].eq(XSTEST_SAFE).fillna(False)] for k, t in tables.items()}
    with style():
        fig = new_figure(2, 2, height=2.8)
        a, b, c, d = fig.axes
        drawn = [
            line_panel(
                a,
                base_only,
                "hr_coupling",
                title="H/R coupling |cos(h, r)|, own directions",
                ylabel="|cos(h, r)| (unitless)",
                carrier="hr",
                source=["reextracted", "floor"],
                ylim=(0.0, None),
            ),
            transfer_panel(b, attack_only),
            line_panel(
                c,
                safe_only,
                "over_refusal",
                title="over-refusal, XSTest safe prompts",
                ylabel="refusal rate (fraction)",
                ylim=(-0.03, 1.03),
            ),
            line_panel(
                d,
                base_only,
                "cross_entropy",
                title="utility: GSM8K answer cross-entropy",
                ylabel="nats per token (lower is better)",
            ),
        ]
        b.set_ylim(-0.03, 1.03)
        return finish_figure(fig, f"SFT vs R2D2 on {model} (seed 0)", drawn)


def _claims_json(claims: Mapping[int, list[Claim]]) -> dict[str, Any]:
    return {
        str(seed): [
            {"key": c.key, "text": c.text, "verdict": c.verdict, "parts": list(c.parts)}
            for c in found
        ]
        for seed, found in claims.items()
    }


def _json_ready(
    study: Mapping[str, Any],
    claims: Mapping[int, list[Claim]],
    early: int | None,
    at_peak: tuple[int, Mapping[int, list[Claim]]] | None,
) -> dict[str, Any]:
    e, last = early_late(study["steps"], early)
    return {
        "model": study.get("model", "tiny-chat"),
        "quick": bool(study.get("quick")),
        "settings": asdict(study["settings"]),
        "seeds": list(study["seeds"]),
        "early_step": e,
        "late_step": last,
        "attack_success_on_base": dict(study["attacks"]),
        "timings_s": {k: round(v, 1) for k, v in study["timings"].items()},
        "claims": _claims_json(claims),
        "peak_step": None if at_peak is None else at_peak[0],
        "claims_at_peak": None if at_peak is None else _claims_json(at_peak[1]),
        "r2d2_pool": {str(seed): list(entries) for seed, entries in study["pool"].items()},
        "rows": json.loads(study["rows"].to_json(orient="records")),
    }


def write_outputs(
    study: Mapping[str, Any], *, early: int | None, json_path: Path, md_path: Path, figure: Path
) -> dict[int, list[Claim]]:
    """Judge the claims (at ``early`` and, where it differs, at R2D2's coupling peak,
    :func:`peak_step`) and write the JSON, the markdown and the figure (the first seed's audits).

    Returns:
        The claims by seed at ``early``.
    """
    claims = claims_by_seed(study, early)
    peak = peak_step(study)
    at_peak = None
    if peak != early_late(study["steps"], early)[0]:
        at_peak = (peak, claims_by_seed(study, peak))
    write_text(json_path, json.dumps(_json_ready(study, claims, early, at_peak), indent=1) + "\n")
    write_text(md_path, render_markdown(study, claims, early, figure, at_peak))
    first = study["seeds"][0]
    tables = {LABELS[r]: study["tables"][r, first] for r in LABELS}
    save_figure(plot_study(tables, study.get("model", "tiny-chat")), figure)
    return claims
