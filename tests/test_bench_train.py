"""benchmarks/bench_train.py on a tiny random Llama, 2 timed steps: the structure of its tables
and JSON (every method, ratios to LoRA, goals, set-up rows, peak memory), the token positions each
method's forwards feed, the block size and the shared cone fits; never a timing."""

from __future__ import annotations

import contextlib
import io
import json
import statistics
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

from safegeom.config import config_dict
from safegeom.training.methods.refusalguard import GuardConfig
from tests.script_helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script(SCRIPT)


def _run(bench: ModuleType, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "results.json"
    argv = ["--preset", "tiny-random", "--no-progress", "--json", str(out), *args]
    assert bench.main(argv) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def every_method(bench, tmp_path_factory) -> tuple[dict, str]:
    """One run of every method without memory: the JSON results and the printed tables."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        results = _run(bench, tmp_path_factory.mktemp("every"), "--no-memory")
    return results, out.getvalue()


def test_every_method_gets_a_row_a_ratio_and_its_goal(bench, every_method) -> None:
    results, text = every_method
    variants = bench.VARIANTS
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == list(variants)  # the table's order
    # the default penalty_every 2 makes blocks of 2 rounds: whole blocks, 2 warm-up steps
    assert results["block"] == 2 and results["steps"] == 2 and results["warmup"] == 2
    assert rows["lora"]["ratio"] == pytest.approx(1.0)
    assert results["lora_step_s"] == pytest.approx(rows["lora"]["step_s"])
    for name, row in rows.items():
        goal = variants[name].goal
        assert row["label"] == variants[name].label and row["label"] in text
        assert row["step_s"] > 0 and row["ratio"] > 0 and len(row["times_s"]) == 2
        assert row["goal"] == goal and row["peak_bytes"] is None and row["peak_ratio"] is None
        assert row["goal_met"] == (None if goal is None else row["ratio"] <= goal)
        assert row["tokens_per_step"] == pytest.approx(sum(row["step_tokens"]) / 2)
        assert row["calib_tokens_per_step"] == pytest.approx(sum(row["step_calib_tokens"]) / 2)
        if goal is not None:
            assert bench.verdict(row) in text
    assert {r["goal"] for r in rows.values()} == {None, 1.3, 1.6}
    guards = {name: row["guard"] for name, row in rows.items()}
    assert guards["lora"] is None and guards["adaptive"] is None
    assert guards["refusalguard"] == config_dict(GuardConfig())
    assert (
        guards["refusalguard"]["variant"] == "lora" and guards["refusalguard"]["penalty_every"] == 2
    )
    assert guards["refusalguard-every1"]["penalty_every"] == 1
    assert guards["refusalguard-calib4"]["calib_batch"] == 4
    assert guards["refusalguard-reft"]["variant"] == "reft"
    setup = {(s["part"], s["method"]): s for s in results["setup"]}
    shared = "calibration cache (cones shared)"
    assert set(setup) == {
        ("cones + calibration cache", "refusalguard"),
        (shared, "refusalguard-every1"),
        (shared, "refusalguard-calib4"),
        (shared, "refusalguard-reft"),
        ("risk probe fit", "adaptive"),
        ("risk scores of the task prompts", "adaptive"),
    }
    for s in setup.values():
        assert s["seconds"] > 0
        assert s["lora_steps"] == pytest.approx(s["seconds"] / results["lora_step_s"])
        assert s["part"] in text
    assert "set-up (once per run)" in text and "LoRA steps" in text
    assert results["config"]["task"] == "mix:16" and results["versions"]["torch"]


def test_r2d2_steps_are_split_into_attack_and_training(bench, every_method) -> None:
    results, text = every_method
    rows = {r["method"]: r for r in results["rows"]}
    split = {r["method"]: r for r in results["r2d2"]}
    assert list(split) == ["r2d2-m1", "r2d2-m5"] and "R2D2 step split" in text
    for name, row in split.items():
        assert row["gcg_steps"] == bench.VARIANTS[name].r2d2.gcg_steps
        assert row["gcg_s"] > 0 and row["pool_s"] > 0 and row["train_s"] > 0
        assert len(row["attack_parts_s"]) == len(rows[name]["times_s"]) == 2
        for (gcg, pool), whole in zip(row["attack_parts_s"], rows[name]["times_s"], strict=True):
            assert 0 < gcg + pool < whole  # the attack is part of the step
        assert row["lora_s"] == pytest.approx(statistics.median(rows["lora"]["times_s"]))
        assert row["label"] in text
    assert rows["r2d2-m1"]["tokens_per_step"] < rows["r2d2-m5"]["tokens_per_step"]


def test_positions_count_the_task_reference_and_decoder_only_penalty_forwards(
    every_method,
) -> None:
    rows = {r["method"]: r for r in every_method[0]["rows"]}
    fed = {name: row["step_tokens"] for name, row in rows.items()}
    calib = {name: row["step_calib_tokens"] for name, row in rows.items()}
    head = {name: [f - c for f, c in zip(fed[name], calib[name], strict=True)] for name in rows}
    task = head["lora"]  # timed steps 2 and 3: the same task batches for every method
    assert all(n > 0 for n in task) and fed["lora"] == task
    for name in ("sft", "kl", "adaptive"):
        assert calib[name] == [0, 0]  # no decoder-only forward
    assert head["sft"] == task and head["kl"] == head["adaptive"] == [2 * n for n in task]
    guard_rows = [n for n in rows if n.startswith("refusalguard")]
    for name in guard_rows:
        assert head[name] == task  # the penalty never reaches the LM head
    # penalty every 2 steps: step 2 is penalised, step 3 not; every 1: both
    one, two = calib["refusalguard"]
    assert one > 0 and one % 8 == 0 and two == 0  # 8 calibration prompts padded among themselves
    assert calib["refusalguard-every1"][0] == one and calib["refusalguard-every1"][1] > 0
    assert calib["refusalguard-reft"] == calib["refusalguard"]  # same calibration batches
    four = calib["refusalguard-calib4"][0]
    assert 0 < four < one and four % 4 == 0 and calib["refusalguard-calib4"][1] == 0


def test_cpu_peak_memory_comes_from_a_subprocess_per_method(bench, tmp_path, capsys) -> None:
    results = _run(bench, tmp_path, "--methods", "lora,refusalguard", "--steps", "1")
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == ["lora", "refusalguard"]
    # whole penalty cycles: 1 step is rounded up to a block of 2, warm-up raised to 2
    assert results["block"] == 2 and results["steps"] == 2 and results["warmup"] == 2
    lora, guard = rows["lora"]["peak_bytes"], rows["refusalguard"]["peak_bytes"]
    assert lora > 0 and guard > 0  # a step allocates activations, gradients, optimizer state
    assert rows["lora"]["peak_ratio"] == 1.0
    assert rows["refusalguard"]["peak_ratio"] == pytest.approx(guard / lora)
    out, err = capsys.readouterr()
    assert f"{guard / 2**20:,.1f}" in out
    assert "memory [1/2] lora" in err and "memory [2/2] refusalguard" in err


def test_blocks_hold_whole_penalty_cycles_of_every_row(bench, monkeypatch) -> None:
    assert bench.block_size(["lora", "sft", "kl"]) == 1
    assert bench.block_size(["lora", "refusalguard-every1"]) == 1
    assert bench.block_size(list(bench.VARIANTS)) == 2
    every3 = replace(bench.VARIANTS["refusalguard"], guard=GuardConfig(penalty_every=3))
    monkeypatch.setitem(bench.VARIANTS, "every3", every3)
    assert bench.block_size(["lora", "refusalguard", "every3"]) == 6  # not the largest, 3


def test_rows_share_a_cone_fit_only_when_it_is_the_same(bench) -> None:
    keys = {name: bench.defence_key(v) for name, v in bench.VARIANTS.items()}
    assert len({keys[n] for n in keys if n.startswith("refusalguard")}) == 1
    assert keys["adaptive"] == "adaptive" and keys["kl"] == "kl"
    other = replace(bench.VARIANTS["refusalguard"], guard=GuardConfig(cone_k=2))
    assert bench.defence_key(other) != keys["refusalguard"]


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


def test_a_preset_sets_the_r2d2_rows_search_width(bench, tmp_path) -> None:
    from accelerate import Accelerator

    width = bench.VARIANTS["r2d2-m1"].r2d2.search_width  # train_methods.R2D2's, not changed
    assert bench.PRESETS["smol-chat"].search_width < width == 64  # a CPU-sized GCG
    assert bench.PRESETS["tiny-chat"].search_width == width
    preset = replace(bench.PRESETS["tiny-random"], search_width=8)
    runner, _ = bench.build_runner(
        "r2d2-m1", preset, Accelerator(cpu=True), tmp_path, fresh=True, total_steps=2
    )
    state = runner.step_loss.state
    assert state.settings.search_width == 8 and state.record["search_width"] == 8
    assert state.settings.gcg_steps == 1 and bench.VARIANTS["r2d2-m1"].r2d2.search_width == 64
