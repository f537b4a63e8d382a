"""The SFT-vs-R2D2 study (analyses/adversarial.py): a quick run's tables hold what the report
reads, and every claim's verdict follows from the rows it names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from analyses.adversarial import ATTACKS, QUICK, REFUSAL, output_paths, run_study
from analyses.adversarial_claims import (
    APPEARS,
    CANNOT_TELL,
    NOT_APPEARS,
    QUANTITY_COLUMNS,
    SATURATED,
    XSTEST_SAFE,
    Estimate,
    at_least,
    combine,
    compare,
    judge_claims,
)
from analyses.adversarial_report import (
    UTILITY,
    claims_by_seed,
    peak_step,
    render_markdown,
    write_outputs,
)
from analyses.adversarial_settings import SMOL, Settings, default_seeds, study_settings

VERDICTS = {APPEARS, NOT_APPEARS, CANNOT_TELL}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A quick study (seed 0): attack sets, both recipes trained and audited."""
    work = tmp_path_factory.mktemp("adversarial")
    out = run_study(QUICK, [0], work)
    out["work"] = work
    return out


def test_quick_study_tables_have_what_the_report_reads(study: dict[str, Any]) -> None:
    rows = study["rows"]
    assert list(rows.columns) == list(QUANTITY_COLUMNS)
    steps = list(range(0, QUICK.steps + 1, QUICK.save_every))
    assert study["steps"] == steps
    needed = [
        "coupling",
        "drift",
        "ablation_effect",
        *(f"attack_asr:{a}" for a in ATTACKS),
        f"over_refusal:{XSTEST_SAFE}",
        UTILITY,
        "kl_to_base",
    ]
    for recipe in ("sft", "r2d2"):
        mine = rows[rows["recipe"].eq(recipe)]
        for quantity in needed:
            have = mine[mine["quantity"].eq(quantity)]
            assert sorted(have["step"].unique()) == steps, (recipe, quantity)
            assert (have["ci_low"] <= have["value"] + 1e-12).all()
            assert (have["value"] <= have["ci_high"] + 1e-12).all()
    # at the base both recipes read the same model: the same numbers
    base = rows[rows["step"].eq(0)].set_index(["quantity", "anchor", "recipe"])["value"]
    assert base.xs("sft", level="recipe").equals(base.xs("r2d2", level="recipe"))
    # the attack sets' ASR at the base is their success on the source
    for name, success in study["attacks"].items():
        at_base = rows[rows["quantity"].eq(f"attack_asr:{name}") & rows["step"].eq(0)]
        assert at_base["value"].iloc[0] == pytest.approx(success)


def test_quick_study_matches_the_recipes_data(study: dict[str, Any]) -> None:
    work: Path = study["work"]
    utility = [json.loads(x) for x in (work / "utility.jsonl").read_text().splitlines()]
    sft = [json.loads(x) for x in (work / "sft.jsonl").read_text().splitlines()]
    assert len(utility) == QUICK.n_utility and len(sft) == QUICK.n_behaviours + QUICK.n_utility
    assert [r["response"] for r in sft[: QUICK.n_behaviours]] == [REFUSAL] * QUICK.n_behaviours
    assert sft[QUICK.n_behaviours :] == utility
    r2d2 = json.loads((work / "runs" / "r2d2-s0" / "trajectory.json").read_text())
    lora = json.loads((work / "runs" / "sft-s0" / "trajectory.json").read_text())
    text = json.dumps(r2d2)
    assert "utility.jsonl" in text and "sft.jsonl" in json.dumps(lora)
    pool = study["pool"][0]
    assert [e["step"] for e in pool] == list(
        range(QUICK.save_every, QUICK.steps + 1, QUICK.save_every)
    )
    assert all({"pool_asr", "pool_loss", "away", "toward", "utility"} <= set(e) for e in pool)


def test_report_claims_come_from_the_rows(study: dict[str, Any], tmp_path: Path) -> None:
    study = {**study, "quick": True}
    out = {k: tmp_path / f"r.{k}" for k in ("json", "md", "png")}
    claims = write_outputs(
        study, early=None, json_path=out["json"], md_path=out["md"], figure=out["png"]
    )
    assert out["png"].stat().st_size > 10_000
    saved = json.loads(out["json"].read_text())
    again = judge_claims(study["rows"], 0, QUICK.save_every, QUICK.steps, list(ATTACKS), UTILITY)
    assert [c.verdict for c in claims[0]] == [c.verdict for c in again]
    assert [c["verdict"] for c in saved["claims"]["0"]] == [c.verdict for c in again]
    text = out["md"].read_text()
    for claim in again:
        assert claim.verdict in VERDICTS
        assert f"({claim.key}) {claim.text}" in text
        for part in claim.parts:
            assert (
                f"| {part['what']} | {part['left']} | {part['right']} | {part['verdict']} |" in text
            )
    assert claims_by_seed(study, None)[0][0].parts == again[0].parts


def test_compare_at_least_and_combine() -> None:
    high, low = Estimate(0.8, 0.7, 0.9), Estimate(0.3, 0.2, 0.4)
    overlapping = Estimate(0.65, 0.35, 0.75)
    assert compare(high, low, "higher") == APPEARS
    assert compare(low, high, "higher") == NOT_APPEARS
    assert compare(low, high, "lower") == APPEARS
    assert compare(overlapping, low, "higher") == CANNOT_TELL
    assert compare(Estimate(1.0, 1.0, 1.0), Estimate(1.0, 1.0, 1.0), "lower") == CANNOT_TELL
    assert at_least(Estimate(0.9, SATURATED, 1.0), SATURATED) == APPEARS
    assert at_least(Estimate(0.7, 0.6, 0.79), SATURATED) == NOT_APPEARS
    assert at_least(Estimate(0.8, 0.7, 0.9), SATURATED) == CANNOT_TELL
    assert combine([APPEARS, APPEARS]) == APPEARS
    assert combine([APPEARS, CANNOT_TELL]) == CANNOT_TELL
    assert combine([APPEARS, CANNOT_TELL, NOT_APPEARS]) == NOT_APPEARS
    assert combine([]) == CANNOT_TELL


def _rows(values: dict[tuple[str, int, str], tuple[float, float, float]]) -> pd.DataFrame:
    records = [
        {
            "recipe": recipe,
            "seed": 0,
            "step": step,
            "quantity": quantity,
            "anchor": "base" if quantity == "coupling" else None,
            "value": v,
            "ci_low": lo,
            "ci_high": hi,
            "n": 24,
        }
        for (recipe, step, quantity), (v, lo, hi) in values.items()
    ]
    return pd.DataFrame(records, columns=list(QUANTITY_COLUMNS))


def _paper_like() -> dict[tuple[str, int, str], tuple[float, float, float]]:
    """A constructed study where every finding holds with disjoint CIs (E = 10, L = 60)."""
    v: dict[tuple[str, int, str], tuple[float, float, float]] = {}
    for recipe in ("sft", "r2d2"):
        v[recipe, 0, "coupling"] = (0.3, 0.25, 0.35)
        v[recipe, 0, "attack_asr:gcg"] = (0.9, 0.8, 1.0)
        v[recipe, 0, UTILITY] = (2.0, 1.9, 2.1)
        v[recipe, 0, f"over_refusal:{XSTEST_SAFE}"] = (0.2, 0.1, 0.3)
    v["r2d2", 10, "coupling"] = (0.6, 0.55, 0.65)
    v["sft", 10, "coupling"] = (0.3, 0.25, 0.35)
    v["r2d2", 10, "attack_asr:gcg"] = (0.05, 0.0, 0.1)
    v["r2d2", 10, f"over_refusal:{XSTEST_SAFE}"] = (0.95, 0.9, 1.0)
    v["r2d2", 10, UTILITY] = (4.0, 3.8, 4.2)
    v["r2d2", 60, "coupling"] = (0.2, 0.15, 0.25)
    v["r2d2", 60, UTILITY] = (3.0, 2.9, 3.1)
    v["r2d2", 60, "attack_asr:gcg"] = (0.5, 0.4, 0.6)
    v["sft", 60, "coupling"] = (0.2, 0.15, 0.25)
    v["sft", 60, "attack_asr:gcg"] = (0.9, 0.8, 1.0)
    return v


def _verdicts(values: dict[tuple[str, int, str], tuple[float, float, float]]) -> list[str]:
    claims = judge_claims(_rows(values), 0, 10, 60, ["gcg"], UTILITY)
    return [c.verdict for c in claims]


def test_claims_on_constructed_tables() -> None:
    v = _paper_like()
    assert _verdicts(v) == [APPEARS, APPEARS, APPEARS]
    # (a): over-refusal short of saturation; (b): coupling CIs overlap; (c): SFT more robust
    v["r2d2", 10, f"over_refusal:{XSTEST_SAFE}"] = (0.5, 0.4, 0.6)
    v["r2d2", 60, "coupling"] = (0.55, 0.5, 0.6)
    v["sft", 60, "attack_asr:gcg"] = (0.1, 0.0, 0.2)
    assert _verdicts(v) == [NOT_APPEARS, CANNOT_TELL, NOT_APPEARS]
    # a missing number cannot be judged
    del v["sft", 10, "coupling"]
    assert judge_claims(_rows(v), 0, 10, 60, ["gcg"], UTILITY)[0].parts[0]["left"] == "missing"


def test_peak_step_is_the_highest_r2d2_coupling() -> None:
    v = _paper_like()
    study = {"seeds": [0], "steps": [0, 10, 60], "rows": _rows(v)}
    assert peak_step(study) == 10
    v["r2d2", 60, "coupling"] = (0.7, 0.65, 0.75)
    assert peak_step({**study, "rows": _rows(v)}) == 60


def test_model_option_picks_sizes_seeds_and_paths() -> None:
    assert study_settings("tiny-chat") == Settings() and Settings().steps == 80
    assert study_settings("smol-chat") == SMOL and SMOL.steps < Settings().steps
    assert study_settings("smol-chat", quick=True) == QUICK == study_settings("tiny-chat", True)
    with pytest.raises(ValueError, match="smol-chat"):
        study_settings("gpt-2")
    assert default_seeds("tiny-chat") == "0,1,2" and default_seeds("smol-chat") == "0"
    assert output_paths("tiny-chat") == (
        Path("analyses/results/adversarial.json"),
        Path("analyses/results/adversarial.md"),
        Path("figures/adversarial_tiny-chat.png"),
    )
    assert output_paths("smol-chat")[0] == Path("analyses/results/adversarial_smol-chat.json")


def test_report_names_the_model_and_its_limits(study: dict[str, Any]) -> None:
    tiny = render_markdown(study, claims_by_seed(study, None), None, Path("f.png"))
    assert tiny.startswith("# SFT vs R2D2 on tiny-chat") and "## What tiny-chat limits" in tiny
    assert "the base alone (one seed" in tiny
    smol = {**study, "model": "smol-chat"}
    text = render_markdown(smol, claims_by_seed(smol, None), None, Path("f.png"))
    assert text.startswith("# SFT vs R2D2 on smol-chat") and "## What smol-chat limits" in text
    assert "`smol-chat` (its safety adapter merged" in text
    assert "seed 0 only" in text and "4.7M-parameter" not in text
