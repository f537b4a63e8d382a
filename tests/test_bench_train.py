"""benchmarks/bench_train.py on a tiny random Llama, 1-2 steps: the structure of its tables and
JSON (every method, ratios to LoRA, goals, set-up rows, peak memory), never a timing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(bench: ModuleType, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "results.json"
    argv = ["--preset", "tiny-random", "--no-progress", "--json", str(out), *args]
    assert bench.main(argv) == 0
    return json.loads(out.read_text())


def test_every_method_gets_a_row_a_ratio_and_its_goal(bench, tmp_path, capsys) -> None:
    results = _run(bench, tmp_path, "--no-memory")
    text = capsys.readouterr().out
    variants = bench.VARIANTS
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == list(variants)  # the table's order
    # penalty_every 2 makes blocks of 2 rounds: whole blocks, a penalised warm-up step
    assert results["block"] == 2 and results["steps"] == 2 and results["warmup"] == 2
    assert rows["lora"]["ratio"] == pytest.approx(1.0)
    assert results["lora_step_s"] == pytest.approx(rows["lora"]["step_s"])
    for name, row in rows.items():
        goal = variants[name].goal
        assert row["label"] == variants[name].label and row["label"] in text
        assert row["step_s"] > 0 and row["ratio"] > 0 and len(row["times_s"]) == 2
        assert row["goal"] == goal and row["peak_bytes"] is None and row["peak_ratio"] is None
        assert row["goal_met"] == (None if goal is None else row["ratio"] <= goal)
        assert row["tokens_per_step"] > 0
        if goal is not None:
            assert bench.verdict(row) in text
    assert {r["goal"] for r in rows.values()} == {None, 1.3, 1.6}
    guards = {name: row["guard"] for name, row in rows.items()}
    assert guards["lora"] is None and guards["adaptive"] is None
    assert guards["refusalguard-calib4"]["calib_batch"] == 4
    assert guards["refusalguard-every2"]["penalty_every"] == 2
    assert guards["refusalguard-lora"]["variant"] == "lora"
    tokens = {name: row["tokens_per_step"] for name, row in rows.items()}
    # the reference forward (kl, adaptive) and the calibration rows (refusalguard) add positions
    assert tokens["sft"] == tokens["lora"] < tokens["kl"] == tokens["adaptive"]
    assert tokens["lora"] < tokens["refusalguard-calib4"] < tokens["refusalguard"]
    assert tokens["refusalguard-every2"] < tokens["refusalguard"] == tokens["refusalguard-lora"]
    setup = {(s["part"], s["method"]): s for s in results["setup"]}
    shared = "calibration cache (cones shared)"
    assert set(setup) == {
        ("cones + calibration cache", "refusalguard"), (shared, "refusalguard-lora"),
        (shared, "refusalguard-every2"), (shared, "refusalguard-calib4"),
        ("risk probe fit", "adaptive"), ("risk scores of the task prompts", "adaptive"),
    }  # fmt: skip
    for s in setup.values():
        assert s["seconds"] > 0
        assert s["lora_steps"] == pytest.approx(s["seconds"] / results["lora_step_s"])
        assert s["part"] in text
    assert "set-up (once per run)" in text and "LoRA steps" in text
    assert results["config"]["task"] == "mix:16" and results["versions"]["torch"]


def test_cpu_peak_memory_comes_from_a_subprocess_per_method(bench, tmp_path, capsys) -> None:
    results = _run(bench, tmp_path, "--methods", "lora,refusalguard", "--steps", "1")
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == ["lora", "refusalguard"] and results["block"] == 1
    assert results["steps"] == 1 and results["warmup"] == 1
    lora, guard = rows["lora"]["peak_bytes"], rows["refusalguard"]["peak_bytes"]
    assert lora > 0 and guard > 0  # a step allocates activations, gradients, optimizer state
    assert rows["lora"]["peak_ratio"] == 1.0
    assert rows["refusalguard"]["peak_ratio"] == pytest.approx(guard / lora)
    assert f"{guard / 2**20:,.1f}" in capsys.readouterr().out


def test_verdict_says_by_how_much_a_goal_is_missed(bench) -> None:
    assert bench.verdict({"goal": 1.3, "goal_met": False, "ratio": 1.43}) == (
        "missed by +0.13x (10% over)"
    )
    assert bench.verdict({"goal": 1.6, "goal_met": True, "ratio": 1.2}) == "met"
    assert bench.verdict({"goal": None, "goal_met": None, "ratio": 2.0}) == "-"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "sft,kl"], "--methods must include lora"),
        (["--methods", "lora,dpo"], "--methods must include lora and be among lora, sft"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--batch-size", "-2"], "--batch-size must be at least 1"),
    ],
)
def test_bad_options_are_refused_with_a_message(bench, capsys, args, message) -> None:
    with pytest.raises(SystemExit) as err:
        bench.main(args)
    assert err.value.code == 2
    assert message in capsys.readouterr().err
