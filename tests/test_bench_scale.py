"""benchmarks/bench_scale.py at its tiny preset: a 1-process and a 2-process job (gloo on CPU)
started as a launcher starts them, the structure of its table and JSON, the summary's arithmetic
on made-up timings, a failing rank's message and bad options; never a timing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import ModuleType

import pytest

from tests.script_helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script(SCRIPT)


def test_one_repeat_at_tiny_size_gives_every_path_a_row(bench, tmp_path, capsys) -> None:
    out = tmp_path / "scale.json"
    argv = ["--preset", "tiny", "--repeats", "1", "--no-progress", "--json", str(out)]
    assert bench.main(argv) == 0
    text = capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert (
        payload["config"] == dataclasses.asdict(bench.PRESETS["tiny"]) and payload["repeats"] == 1
    )
    jobs = payload["jobs"]
    assert [(j["repeat"], j["world"]) for j in jobs] == [(0, 1), (0, 2)]
    for job in jobs:
        ranks = job["ranks"]
        assert [r["rank"] for r in ranks] == list(range(job["world"]))
        assert all(r["world"] == job["world"] and r["threads"] == 1 for r in ranks)
        assert all(set(r["seconds"]) == set(bench.PATHS) for r in ranks)
    n = bench.PRESETS["tiny"].n_prompts
    shape = jobs[0]["ranks"][0]["check"]["capture"]["shape"]
    assert shape[0] == n and shape[1] == bench.PRESETS["tiny"].layers  # [prompts, layers, pos, d]
    tokens = payload["tokens"]
    assert bench.PRESETS["tiny"].min_tokens < tokens["min"] <= tokens["mean"] <= tokens["max"]
    results = payload["results"]
    assert list(results) == list(bench.PATHS)
    for path, res in results.items():
        assert res["label"] == bench.PATHS[path] and res["label"] in text
        t1, t2 = res["seconds"]["1"], res["seconds"]["2"]
        assert len(t1) == len(t2) == 1
        slowest = max(r["seconds"][path] for r in jobs[1]["ranks"])
        assert t2 == [slowest]
        rate = res["prompts_per_s"]
        assert rate["1"] == pytest.approx(n / t1[0]) and rate["2"] == pytest.approx(n / t2[0])
        assert res["efficiency"] == pytest.approx(rate["2"] / (2 * rate["1"]))
        assert res["goal"] == bench.GOAL and res["goal_met"] == (res["efficiency"] >= bench.GOAL)
        assert res["same"] is True  # two processes returned what one did
    assert "same results" in text and "efficiency" in text and f"wrote {out}" in text


def _job(repeat: int, world: int, seconds: list[float], check: float = 1.0) -> dict:
    ranks = [
        {"seconds": {"capture": s}, "check": {"capture": {"sum": check, "shape": [4]}}}
        for s in seconds
    ]
    return {"repeat": repeat, "world": world, "ranks": ranks}


def test_summary_takes_the_slowest_rank_and_medians_of_paired_repeats(bench) -> None:
    jobs = [
        _job(0, 1, [4.0]),
        _job(0, 2, [1.0, 2.5]),  # efficiency 4 / 5 = 0.8
        _job(1, 2, [2.0, 1.0]),
        _job(1, 1, [4.0]),  # 1.0
        _job(2, 1, [8.0]),
        _job(2, 2, [4.0, 4.4]),
    ]  # 8 / 8.8
    res = bench.summarise(jobs, ["capture"], n_prompts=40)["capture"]
    assert res["seconds"] == {"1": [4.0, 4.0, 8.0], "2": [2.5, 2.0, 4.4]}
    assert res["efficiencies"] == pytest.approx([0.8, 1.0, 8 / 8.8])
    assert res["efficiency"] == pytest.approx(8 / 8.8)  # the median pair, not a ratio of medians
    assert res["prompts_per_s"] == pytest.approx({"1": 10.0, "2": 40 / 2.5})
    assert res["goal_met"] is True and res["same"] is True
    jobs[3] = _job(1, 1, [4.0], check=1.5)
    assert bench.summarise(jobs, ["capture"], n_prompts=40)["capture"]["same"] is False


def test_a_failing_rank_stops_the_run_with_its_message(bench, tmp_path) -> None:
    spec = {"preset": {"hidden": 8, "bogus": 1}, "paths": ["capture"]}
    # both ranks fail; the first to exit is reported (the other is stopped at once)
    with pytest.raises(
        RuntimeError, match=r"rank [01] of the 2-process job exited with status 1"
    ) as err:
        bench.launch(2, spec, tmp_path, timeout=120)
    assert "unexpected keyword argument 'bogus'" in str(err.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--paths", "capture,disk"], "--paths must be among capture, stats, evaluate"),
        (["--prompts", "1"], "--prompts must be at least 2, got 1"),
        (["--repeats", "0"], "--repeats must be at least 1, got 0"),
        (["--new-tokens", "0"], "--new-tokens must be at least 1, got 0"),
    ],
)
def test_bad_options_are_refused_with_a_message(bench, capsys, args, message) -> None:
    with pytest.raises(SystemExit) as err:
        bench.main(args)
    assert err.value.code == 2
    assert message in capsys.readouterr().err
