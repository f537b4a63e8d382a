"""``safegeom demo`` end to end on tiny-chat, with small sizes so it runs in well under a minute."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from safegeom.audit import load_audit
from safegeom.carriers import load_carrier
from safegeom.demo import BEHAVIOUR_SETS, REAL_MODEL_RUN, DemoConfig, run_demo
from safegeom.plots import FIGURES
from safegeom.training import load_trajectory


def test_demo_writes_a_readable_report(tmp_path: Path) -> None:
    config = DemoConfig(
        n_eval=4, n_train=8, n_val=4, n_random=2, lora_steps=2, save_every=1, max_new_tokens=6
    )
    summary = run_demo(tmp_path, config, echo=False)
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["n_eval"] == 4
    behaviour = pd.read_parquet(tmp_path / "behaviour.parquet")
    assert list(behaviour["set"]) == list(BEHAVIOUR_SETS) and (behaviour.n == 4).all()
    refusal = load_carrier(tmp_path / "carriers" / "refusal.safetensors")
    assert refusal.layer == summary["carriers"]["refusal"]["layer"]
    check = pd.read_parquet(tmp_path / "ablation_check.parquet")
    assert set(check.metric) == {"refusal_score", "refusal_rate"} and (check.n_controls == 2).all()
    trajectory = load_trajectory(tmp_path / "lora-harmful")
    assert trajectory.steps == (0, 1, 2)
    along = pd.read_parquet(tmp_path / "trajectory_behaviour.parquet")
    assert sorted(set(along.step)) == [0, 1, 2]
    report = (tmp_path / "report.md").read_text()
    for heading in ("Behaviour", "Carriers", "Ablation check", "Harmful LoRA trajectory", "Audit"):
        assert heading in report
    assert REAL_MODEL_RUN in report  # where the real-model run is
    assert "(the tiny-chat preset of DEMO_PRESETS; set explicitly: n_eval, n_train," in report
    audited = load_audit(tmp_path / "audit")
    assert audited.steps == (0, 1, 2) and set(audited.table.metric) >= {"asr", "ablation_effect"}
    assert [row["step"] for row in summary["audit"]["steps"]] == [0, 1, 2]
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    drawn = sorted(name for name, spec in FIGURES.items() if not spec.anchored)  # no anchors
    assert figures == [f"{name}.png" for name in drawn]
    assert all(f"](figures/{name})" in report for name in figures)
