"""The defence study's pure parts (``analyses/defences_stats.py``, ``analyses/defences_report.py``):
the learning-rate rule, CIs over seeds and prompts, the table and the targets, on synthetic
numbers. No model is loaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analyses.defences_report import _audit_part, lambda_rows, targets
from analyses.defences_stats import (
    METRICS,
    markdown_table,
    pick_lr,
    seed_prompt_ci,
    summarise,
    table_rows,
)
from safegeom.audit.schema import frame
from safegeom.plots.data import at_carrier_layer, carrier_layer, select
from tests.test_figures_cli import save_audit
from tests.test_plots import CARRIER_LAYER, synthetic_audit


def test_pick_lr_best_accuracy_wins() -> None:
    assert pick_lr({1e-3: 0.7, 2e-3: 0.9, 5e-3: 0.8}) == 2e-3


def test_pick_lr_ties_go_to_the_larger_lr_and_failed_runs_are_skipped() -> None:
    assert pick_lr({1e-3: 1.0, 2e-3: 0.9, 5e-3: 1.0}) == 5e-3
    assert pick_lr({1e-3: 0.5, 2e-3: None, 5e-3: float("nan")}) == 1e-3


def test_pick_lr_refuses_a_grid_without_accuracies() -> None:
    with pytest.raises(ValueError, match="no learning rate of the grid"):
        pick_lr({1e-3: None})


def test_seed_prompt_ci_mean_of_seed_means_inside_its_interval() -> None:
    per_seed = [[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0, 0.0, 0.0], [1.0] * 5]
    stat = seed_prompt_ci(per_seed, n_resamples=500)
    means = [0.75, 1 / 6, 1.0]
    assert stat["value"] == pytest.approx(np.mean(means))  # seeds weigh equally, not prompts
    assert stat["per_seed"] == pytest.approx(means)
    assert stat["n_seeds"] == 3 and stat["n_prompts"] == 15
    low, high = stat["ci"]
    assert low < stat["value"] < high
    assert low >= 0.0 and high <= 1.0


def test_seed_prompt_ci_widens_with_seed_spread() -> None:
    rng = np.random.default_rng(1)
    agree = [list(rng.random(50) < 0.5) for _ in range(3)]
    spread = [[0.0] * 50, list(rng.random(50) < 0.5), [1.0] * 50]
    narrow, wide = seed_prompt_ci(agree, n_resamples=500), seed_prompt_ci(spread, n_resamples=500)
    assert wide["ci"][1] - wide["ci"][0] > 2 * (narrow["ci"][1] - narrow["ci"][0])


def test_seed_prompt_ci_constant_values_give_a_point_and_one_seed_works() -> None:
    assert seed_prompt_ci([[0.2, 0.2], [0.2]])["ci"] == pytest.approx([0.2, 0.2])
    one = seed_prompt_ci([[0.0, 1.0] * 20], n_resamples=400)
    assert one["n_seeds"] == 1 and one["ci"][0] < 0.5 < one["ci"][1]


@pytest.mark.parametrize(
    ("per_seed", "message"),
    [([], "at least one seed"), ([[1.0], []], "a seed has no per-prompt values")],
)
def test_seed_prompt_ci_refuses_empty_input(per_seed: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        seed_prompt_ci(per_seed)


def _run(asr: float, acc: float | None, n: int = 20) -> dict:
    k = round(asr * n)
    hits = None if acc is None else [1.0] * round(acc * n) + [0.0] * (n - round(acc * n))
    return {
        "asr": [1.0] * k + [0.0] * (n - k),
        "over_refusal": [0.0] * n,
        "task_accuracy": hits,
        "kl": [0.1] * n,
    }


def test_summarise_and_table_rows_keep_order_and_missing_metrics() -> None:
    harmful = summarise([_run(0.9, None), _run(0.8, None)], n_resamples=200)
    assert harmful["task_accuracy"] is None
    assert harmful["asr"]["value"] == pytest.approx(0.85)
    mix = summarise([_run(0.5, 0.9)], n_resamples=200)
    cells = {("lora", "mix"): mix, ("lora", "harmful"): harmful, ("kl", "mix"): mix}
    rows = table_rows(cells, ["kl", "lora", "sft"], ["harmful", "mix"])
    assert [(r["method"], r["task"]) for r in rows] == [
        ("kl", "mix"),
        ("lora", "harmful"),
        ("lora", "mix"),
    ]
    text = markdown_table(rows, base=mix)
    lines = text.strip().splitlines()
    assert len(lines) == 2 + 1 + 3 and lines[2].startswith("| base (tiny-chat)")
    assert all(heading in lines[0] for heading in METRICS.values())
    assert "| lora | harmful | 0.850 [" in text and " – |" in text  # the missing accuracy
    assert "0.1000 [0.1000, 0.1000]" in text  # KL to 4 decimals
    named = markdown_table(rows, base=mix, model="smol-chat").splitlines()
    assert named[2].startswith("| base (smol-chat) | – |")


def _stat(value: float) -> dict:
    return {"value": value, "ci": [value, value]}


def test_targets_report_points_and_whether_met() -> None:
    table = [
        {"method": m, "task": "mix", "asr": _stat(a), "task_accuracy": _stat(c)}
        for m, a, c in (("lora", 0.50, 0.85), ("rg-lora", 0.12, 0.80), ("adaptive", 0.25, 0.9))
    ]
    flat = [{"step": s, "asr": 0.1, "asr_ci": [0.05, 0.15]} for s in (0, 50)]
    dips = [
        {"step": 0, "asr": 0.1, "asr_ci": [0.05, 0.15]},
        {"step": 50, "asr": 0.6, "asr_ci": [0.5, 0.7]},
    ]
    results = {
        "base": {"mix": {"asr": _stat(0.10)}},
        "table": table,
        "trajectories": {"rg-lora": {"sentiment": flat}, "lora": {"sentiment": dips}},
    }
    got = {t["target"]: (round(t["value"], 6), t["met"]) for t in targets(results)}
    assert got["mix: LoRA raises held-out ASR >= 30 points"] == (40.0, True)
    assert got["mix: LoRA task accuracy >= 80%"] == (85.0, True)
    assert got["mix: rg-lora ASR within 5 points of the base"] == (2.0, True)
    assert got["mix: rg-lora task accuracy >= 90% of LoRA's"] == (round(80 / 0.85, 6), True)
    assert got["mix: adaptive ASR within 10 points of the base"] == (15.0, False)
    sentiment = {k: v for k, v in got.items() if k.startswith("sentiment") and "refusal" in k}
    assert sorted(sentiment.values()) == [(-50.0, True), (0.0, True)]  # lora dips by 50
    assert not any("rg-reft" in k for k in got)  # no runs, no target


def test_lambda_rows_flatten_the_curve() -> None:
    results = {
        "lambda": [
            {"lambda": 0.0, "asr": _stat(0.9), "task_accuracy": _stat(0.8)},
            {"lambda": 1.0, "asr": _stat(0.1), "task_accuracy": _stat(0.7)},
        ]
    }
    rows = lambda_rows(results)
    assert [r["lambda"] for r in rows] == [0.0, 1.0]
    assert rows[1] == {
        "lambda": 1.0,
        "asr": 0.1,
        "asr_low": 0.1,
        "asr_high": 0.1,
        "task_accuracy": 0.7,
        "acc_low": 0.7,
        "acc_high": 0.7,
    }


def test_targets_leave_out_the_ratio_to_a_lora_accuracy_of_zero() -> None:
    table = [
        {"method": m, "task": "mix", "asr": _stat(a), "task_accuracy": _stat(0.0)}
        for m, a in (("lora", 0.5), ("rg-lora", 0.1))
    ]
    results = {"base": {"mix": {"asr": _stat(0.1)}}, "table": table, "trajectories": {}}
    got = [t["target"] for t in targets(results)]
    assert "mix: rg-lora ASR within 5 points of the base" in got
    assert not any("of LoRA's" in t for t in got)


def test_audit_part_keeps_the_carrier_layer_rows_the_overlays_draw(tmp_path: Path) -> None:
    table = synthetic_audit()
    part = _audit_part(save_audit(tmp_path / "audit", table))
    kept = frame(part["rows"])
    assert part["carrier_layer"] == CARRIER_LAYER == carrier_layer(kept)
    assert set(kept["layer"].dropna()) == {CARRIER_LAYER}
    for metric, carrier, source in (
        ("cosine_to_base", "refusal", "reextracted"),
        ("hr_coupling", "hr", "reextracted"),
    ):  # the overlay of the trimmed rows is that of the whole table
        rows = select(kept, metric, carrier=carrier, source=source)
        drawn, _ = at_carrier_layer(rows, carrier_layer(kept))
        rows = select(table, metric, carrier=carrier, source=source)
        whole, _ = at_carrier_layer(rows, carrier_layer(table))
        pd.testing.assert_series_equal(
            drawn["value"].reset_index(drop=True), whole["value"].reset_index(drop=True)
        )
    last = part["last"]["cosine_to_base:last"]
    assert last["value"] < 1.0 and len(last["ci"]) == 2
