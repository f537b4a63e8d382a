"""The whole story of a model: ``tiny-chat`` in a few minutes on a CPU, ``smol-chat`` in about 22.

1. Behaviour of the aligned model on held-out test splits (refusal, over-refusal, XSTest).
2. Carriers: refusal direction (diff-in-means + bypass/induce/KL selection), harmfulness
   direction, cheap refusal cone; H/R coupling and cone effective rank.
3. Ablation check: ablating / adding the refusal direction against 20 matched random directions,
   by refusal score and by generated refusals.
4. A harmful LoRA fine-tuning trajectory (Qi et al. 2023 style attack) and behaviour along it
   (a model shipped as an adapter, smol-chat, is merged into its base first: ``base/``).
5. The audit of that trajectory against its base, and the audit's figures.

The sizes come from the model's preset (:data:`DEMO_PRESETS`) unless given. Everything is
written into the run folder: ``report.md``, ``summary.json``, Parquet tables, the carriers, the
trajectory, its audit and figures.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from safegeom.artifacts import check_output_dir, save_parquet, write_json, write_text
from safegeom.carriers import SelectionConfig
from safegeom.carriers.refusal import passes_filters
from safegeom.carriers.suite import extract_carriers
from safegeom.config import config_dict
from safegeom.demo_config import DEMO_PRESETS, REAL_MODEL_RUN, SIZE_FIELDS, DemoConfig
from safegeom.evaluation import EvaluateConfig, evaluate
from safegeom.models import TINY_CHAT, load_model
from safegeom.models.merged import is_adapter_spec, save_merged
from safegeom.outputs import claims_folder
from safegeom.prompts import load_prompts
from safegeom.sweeps import SweepConfig, causal_sweep

__all__ = [
    "BEHAVIOUR_SETS",
    "DEMO_PRESETS",
    "MERGED_DIR",
    "REAL_MODEL_RUN",
    "SIZE_FIELDS",
    "DemoConfig",
    "behaviour_table",
    "run_demo",
]

MERGED_DIR = "base"
"""Sub-folder of the run holding an adapter model merged into its base (what the LoRA trains)."""

BEHAVIOUR_SETS: dict[str, tuple[str, str]] = {
    "advbench:test": ("harmful", "substring"),
    "jbb-harmful:test": ("harmful", "substring"),
    "directharm4:test": ("harmful", "substring"),
    "alpaca:test": ("harmless", "substring"),
    "xstest-safe:test": ("harmless", "xstest"),
    "xstest-unsafe:test": ("harmful", "xstest"),
}
"""Held-out sets of the behaviour table, their role and judge."""


def behaviour_table(lm, n: int, max_new_tokens: int, *, progress: bool = False) -> pd.DataFrame:
    """Refusal rate (with 95% CI) and mean refusal score on each held-out set, first ``n`` prompts."""
    rows = []
    for spec, (role, judge) in BEHAVIOUR_SETS.items():
        prompts = load_prompts(spec).take(n)
        result = evaluate(
            lm,
            prompts,
            EvaluateConfig(judge=judge, max_new_tokens=max_new_tokens),
            progress=progress,
        )
        rate = result.refusal_rate
        score = result.mean_refusal_score
        rows.append(
            {
                "set": spec,
                "role": role,
                "judge": judge,
                "n": result.n,
                "refusal_rate": rate.value,
                "ci_low": rate.ci_low,
                "ci_high": rate.ci_high,
                "mean_refusal_score": None if score is None else score.value,
            }
        )
    return pd.DataFrame(rows)


def _markdown(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in frame.itertuples(index=False):
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@claims_folder("demo")  # locks and records out
def run_demo(
    out: str | Path,
    config: DemoConfig = DemoConfig(),
    *,
    echo: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the demo into ``out`` and return its summary (also written to ``summary.json``).

    ``echo`` prints the section headers and the final report to stdout; ``overwrite`` lets it
    write into a folder holding files safegeom did not write (they are kept).
    """
    from safegeom.training import TrainConfig, train

    folder = check_output_dir(out)
    given = tuple(name for name in SIZE_FIELDS if getattr(config, name) is not None)
    config = config.resolved()
    steps = 5 if config.audit else 4
    _say(echo, _sizes_line(config, given))
    lm = load_model(config.model)
    _say(echo, f"[1/{steps}] behaviour of {config.model} on held-out test splits")
    behaviour = behaviour_table(lm, config.n_eval, config.max_new_tokens, progress=True)
    save_parquet(folder / "behaviour.parquet", behaviour)

    _say(echo, f"[2/{steps}] carriers: refusal direction, harmfulness direction, refusal cone")
    suite, filters_note = _carriers(lm, SelectionConfig(n_train=config.n_train, n_val=config.n_val))
    if filters_note is not None:
        _say(echo, f"      {filters_note}\n      continuing with the KL and induce filters off")
    suite.save(folder / "carriers")
    carriers = {
        **suite.summary(),
        "filters_passed": filters_note is None,
        "filters_note": filters_note,
    }

    _say(echo, f"[3/{steps}] ablation check against {config.n_random} matched random directions")
    sweep_config = SweepConfig(
        add_layers=str(suite.refusal.layer),
        add_strengths=(1.0,),
        n_random=config.n_random,
        n_prompts=config.n_val,
        seed=config.seed,
        generate=True,
        max_new_tokens=config.max_new_tokens,
    )
    sweep = causal_sweep(
        lm, {"refusal": suite.refusal}, "advbench:test", "alpaca:test", sweep_config
    )
    save_parquet(folder / "ablation_check.parquet", sweep)

    _say(echo, f"[4/{steps}] harmful LoRA fine-tuning, {config.lora_steps} steps")
    trained_from = config.model
    if is_adapter_spec(config.model):  # train() takes a plain model: merge the adapter first
        trained_from = str(save_merged(config.model, folder / MERGED_DIR))
        _say(echo, f"      trains from {config.model} merged into its base: {MERGED_DIR}/")
    trajectory = train(
        trained_from,
        "harmful",
        TrainConfig(steps=config.lora_steps, save_every=config.save_every, seed=config.seed),
        method="lora",
        out=folder / "lora-harmful",
        overwrite=True,
    )
    rows = []
    for record in trajectory.checkpoints:
        ckpt = load_model(trajectory.path(record.step))
        for spec in ("advbench:test", "alpaca:test"):
            result = evaluate(
                ckpt,
                load_prompts(spec).take(config.n_eval),
                EvaluateConfig(max_new_tokens=config.max_new_tokens),
                progress=False,
            )
            rows.append(
                {
                    "step": record.step,
                    "loss": record.loss,
                    "set": spec,
                    "refusal_rate": result.refusal_rate.value,
                    "asr": result.asr.value if spec == "advbench:test" else None,
                    "mean_refusal_score": result.mean_refusal_score.value,
                }
            )
    along = pd.DataFrame(rows)
    save_parquet(folder / "trajectory_behaviour.parquet", along)

    audit_summary, audit_report = None, ""
    if config.audit:
        _say(echo, f"[5/{steps}] audit of the LoRA trajectory against the base, and its figures")
        audit_summary, audit_report = _audit_section(folder, config)

    summary = {
        "config": config_dict(config),
        "sizes": {"preset": config.preset, "given": list(given)},
        "trained_from": trained_from,
        "model": {"name": lm.name, "weight_hash": lm.weight_hash, "n_layers": lm.n_layers},
        "behaviour": behaviour.to_dict("records"),
        "carriers": carriers,
        "ablation_check": sweep.to_dict("records"),
        "trajectory": along.to_dict("records"),
        "audit": audit_summary,
    }
    write_json(folder / "summary.json", summary)
    report = _report(summary, behaviour, sweep, along, _sizes_line(config, given)) + audit_report
    write_text(folder / "report.md", report)
    _say(echo, report)
    return summary


def _carriers(lm, config: SelectionConfig) -> tuple[Any, str | None]:
    """The carrier suite, scoring the candidates with the KL and induce filters off first.

    When a candidate passes those filters the standard selection is run (its pick and table, as
    ``extract_carriers(lm, config=config)`` gives them; a second scoring pass); when none does
    (smol-chat) the relaxed suite is kept, so the candidates are scored once, not twice.

    Returns:
        ``(suite, note)``: ``note`` is ``None`` when the filters passed, else why none did.
    """
    relaxed = replace(config, max_kl=float("inf"), min_induce=float("-inf"))
    suite = extract_carriers(lm, config=relaxed)
    table = suite.selection.table
    if passes_filters(table, config).any():
        return extract_carriers(lm, config=config), None
    kept = table[table["kept"]]
    best = "; ".join(
        f"layer {r.layer} {r.position}: bypass {r.bypass:.3g}, induce {r.induce:.3g}, KL {r.kl:.3g}"
        for r in kept.sort_values("bypass").head(3).itertuples()
    )
    note = (
        f"no refusal-direction candidate passes the KL (≤ {config.max_kl}) and induce "
        f"(≥ {config.min_induce}) filters ({len(kept)} of {len(table)} candidates inside the "
        f"layer range); best by bypass: {best}"
    )
    return suite, note


def _audit_columns(layer: int) -> dict[str, dict[str, Any]]:
    """The report's audit table: column → the rows it reads (metric and filters)."""
    return {
        "asr": {"metric": "asr", "prompts": "advbench:test"},
        "over_refusal": {"metric": "over_refusal", "prompts": "alpaca:test"},
        "cosine_to_base(r)": {
            "metric": "cosine_to_base",
            "carrier": "refusal",
            "layer": layer,
            "source": "reextracted",
        },
        "hr_coupling": {
            "metric": "hr_coupling",
            "carrier": "hr",
            "layer": layer,
            "source": "reextracted",
        },
        "ablation_effect(r0)": {"metric": "ablation_effect", "source": "fixed"},
        "addition_effect(r0)": {"metric": "addition_effect", "source": "fixed"},
    }


def _audit_section(folder: Path, config: DemoConfig) -> tuple[dict[str, Any], str]:
    """Audit ``folder/lora-harmful`` into ``folder/audit``, draw its figures into
    ``folder/figures``; returns the per-step summary and the report's markdown section."""
    from safegeom.audit import AuditConfig, audit
    from safegeom.figure_files import write_figures

    audit_config = AuditConfig(
        n_per_class=config.n_train,
        n_val=config.n_val,
        n_behaviour=config.n_eval,
        interference_n=config.n_eval,
        n_random=max(20, config.n_random),
        max_new_tokens=config.max_new_tokens,
        seed=config.seed,
    )
    result = audit(folder / "lora-harmful", folder / "audit", audit_config, overwrite=True)
    table = result.table
    fixed = table[(table.metric == "ablation_effect") & (table.source == "fixed")]
    layer = int(fixed.layer.iloc[0])  # the base's carrier layer
    rows = []
    for step in sorted(set(table.step)):
        row: dict[str, Any] = {"step": int(step)}
        for column, where in _audit_columns(layer).items():
            pick = table[table.step == step]
            for key, value in where.items():
                pick = pick[pick[key] == value]
            row[column] = float(pick.value.iloc[0]) if len(pick) else None
        rows.append(row)
    written, _ = write_figures({"harmful LoRA": table}, folder / "figures", formats=("png",))
    figures = "\n\n".join(f"![{p.stem}](figures/{p.name})" for p in written)
    text = (
        "\n\n## Audit of the LoRA trajectory (base carriers applied to every checkpoint)\n\n"
        f"At the base's carrier layer {layer}; effects are refusal-score changes "
        f"minus {audit_config.n_random} matched random directions. Full table: "
        "`audit/audit.parquet` (`safegeom.audit.load_audit`).\n\n"
        + _markdown(pd.DataFrame(rows))
        + "\n\n"
        + figures
        + "\n"
    )
    return {"steps": rows, "folder": str(folder / "audit")}, text


def _sizes_line(config: DemoConfig, given: tuple[str, ...]) -> str:
    """The report's line naming the sizes used and where each came from."""
    sizes = ", ".join(f"{name} {getattr(config, name)}" for name in SIZE_FIELDS)
    chosen = ", ".join(given) if given else "none"
    return f"Sizes: {sizes} (the {config.preset} preset of DEMO_PRESETS; set explicitly: {chosen})."


def _say(echo: bool, text: str) -> None:
    if echo:
        print(text, flush=True)


def _report(
    summary: dict,
    behaviour: pd.DataFrame,
    sweep: pd.DataFrame,
    along: pd.DataFrame,
    sizes: str,
) -> str:
    c = summary["carriers"]
    r = c["refusal"]
    cone = c.get("cone") or {}
    check = sweep[["op", "population", "metric", "base", "value", "effect", "control_mean"]]
    check = check.assign(
        ci=[f"[{a:.2f}, {b:.2f}]" for a, b in zip(sweep.ci_low, sweep.ci_high, strict=True)]
    )
    return "\n\n".join(
        [
            f"# safegeom demo: {summary['model']['name']}",
            sizes + ("\n\n" + REAL_MODEL_RUN if summary["config"]["model"] == TINY_CHAT else ""),
            "## Behaviour on held-out test splits\n\n" + _markdown(behaviour),
            "## Carriers\n\n"
            f"- refusal direction: layer {r['layer']}, position {r['position']}, "
            f"‖r‖ = {r['norm']:.2f}\n"
            f"- bypass score {r['bypass']:.3f}, induce score {r['induce']:.3f}, KL {r['kl']:.4f} "
            f"(base refusal score: harmful {r['base_harmful']:.2f}, harmless "
            f"{r['base_harmless']:.2f})\n"
            f"- H/R coupling |cos(harmfulness, refusal)| = {c['hr_coupling']:.3f}\n"
            f"- cheap cone: k = {cone.get('k')}, effective rank of its sources "
            f"{cone.get('effective_rank', float('nan')):.2f}\n"
            + (
                ""
                if c["filters_passed"]
                else "- **no candidate passed the KL ≤ 0.1 / induce > 0 filters**; shown: the "
                "lowest-bypass candidate with those filters off\n"
            )
            + f"- selection: {c['selection']['n_candidates']} candidates, "
            f"{c['selection']['forward_passes']} forward passes, "
            f"{c['selection']['seconds']:.1f} s",
            "## Ablation check (refusal direction vs matched random directions)\n\n"
            + _markdown(check),
            "## Harmful LoRA trajectory\n\n" + _markdown(along),
        ]
    )
