"""``safegeom attack`` end to end on tiny-chat: the attack set, its replay by ``evaluate``,
``--resume`` and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safegeom.attacks import load_attack_set
from safegeom.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

GCG = ["--n-tokens", "6", "--steps", "3", "--search-width", "32", "--top-k", "16"]


def _attack(out: Path, *extra: str) -> list[str]:
    return [
        "attack",
        "tiny-chat",
        "--prompts",
        "advbench:val",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def test_attack_then_evaluate_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gcg"
    assert main(_attack(out, "--limit", "2", "--json", *GCG)) == 0
    summary = json.loads(capsys.readouterr().out)
    attacks = load_attack_set(out)
    assert summary["n"] == len(attacks) == 2 and summary["success_rate"] == attacks.success_rate
    assert attacks.provenance.config["steps"] == 3
    args = [
        "evaluate",
        "tiny-chat",
        "--prompts",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
        "--json",
    ]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["asr"]["value"] == pytest.approx(attacks.success_rate)


def test_resume_continues_per_behaviour(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "prefill"
    assert main(_attack(out, "--method", "prefill", "--limit", "1")) == 0
    assert main(_attack(out, "--method", "prefill", "--limit", "3")) == 2
    assert "already holds an attack set; pass --resume" in capsys.readouterr().err
    assert main(_attack(out, "--method", "prefill", "--limit", "3", "--resume")) == 0
    assert len(load_attack_set(out)) == 3


def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_attack(tmp_path / "a", "--n-tokens", "0")) == 2
    assert capsys.readouterr().err.strip() == (
        "safegeom attack: error: --n-tokens must be at least 1, got 0"
    )
    assert main([*_attack(tmp_path / "b"), "--prompts", "alpaca", "--limit", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("safegeom attack: error: no attack targets for 'alpaca'") and "\n" not in err
    )
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "attack_set.json").write_text("{")
    args = ["evaluate", "tiny-chat", "--prompts", str(tmp_path / "c"), "--device", "cpu"]
    assert main(args) == 2
    assert "is not a readable attack set" in capsys.readouterr().err
