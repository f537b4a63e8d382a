"""benchmarks/bench_audit.py on a tiny random Llama trajectory: a smoke test of its functions (the
naive way computes the audit's numbers with more forward passes), never a timed test."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from safegeom.audit import AuditConfig, build_reference
from safegeom.models import load_model
from tests.audit_helpers import perturbed, run_folder
from tests.script_helpers import load_script
from tests.tiny_models import build_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_audit.py"
CONFIG = AuditConfig(
    n_per_class=8,
    n_val=4,
    n_behaviour=4,
    cone_k=2,
    n_resamples=100,
    max_new_tokens=4,
    xstest=False,
    behaviour_harmful=("advbench:test",),
)


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """A run folder: a tiny random Llama and three checkpoints drifting away from it."""
    root = tmp_path_factory.mktemp("bench")
    base = build_checkpoint(root, "llama")
    steps = {0: base}
    for i, step in enumerate((10, 20, 30)):
        steps[step] = perturbed(base, root / f"p{step}", scale=0.02 * (i + 1), seed=step)
    return run_folder(root / "run", base, steps)


def test_run_benchmark_tables_goals_and_naive_agreement(bench, run, tmp_path, capsys) -> None:
    results = bench.run_benchmark(run, tmp_path, CONFIG, progress=False)
    json.dumps(results)  # JSON-ready
    assert results["train_s"] is None and results["trajectory"] == str(run)
    for mode in ("defaults", "no-generate"):
        res = results["audits"][mode]
        assert res["goal_s"] == bench.GOALS[mode] and res["goal_met"] == (
            res["wall_s"] <= res["goal_s"]
        )
        rows = res["checkpoints"]
        assert [c["step"] for c in rows] == [0, 10, 20, 30]
        for c in rows:
            assert c["forward_passes"] > 0 and c["capture"] > 0
            assert c["total"] == pytest.approx(sum(c[p] for p in ("load", *bench.PHASES)))
    gen = [c["generation"] for c in results["audits"]["no-generate"]["checkpoints"]]
    assert gen == [0.0] * 4  # geometry-only generates nothing
    naive = results["naive"]
    assert naive["checkpoint"] == "step-000030"
    assert naive["naive"]["forward_passes"] > naive["audit"]["forward_passes"] > 0
    assert naive["n_compared"] >= 30 and naive["n_compared"] == naive["n_naive"]
    assert naive["max_abs_diff"] < 1e-3  # the two ways computed the same numbers
    assert set(naive["ratio"]) == {"geometry", "causal", "total"}
    bench.print_report(results)
    text = capsys.readouterr().out
    assert "audit, defaults: seconds per checkpoint and phase" in text
    assert "goal <= 180 s" in text and "goal <= 60 s" in text
    assert ("goal met" in text or "goal missed" in text) and "naive/audit" in text


def test_naive_way_computes_every_family_and_counts_passes(bench, run) -> None:
    lm = load_model(run / "checkpoints" / "step-000030")
    base = load_model(run / "checkpoints" / "step-000000")
    ref = build_reference(base, CONFIG, progress=False)
    geometry, r_t = bench.naive_geometry(lm, ref, CONFIG)
    assert r_t.shape == (lm.d_model,)
    assert {k[0] for k in geometry} == {
        "direction_drift",
        "cosine_to_base",
        "hr_coupling",
        "principal_angle_max",
        "grassmann_distance",
        "effective_rank",
        "coordinate_separation",
        "coordinate_imbalance",
        "projection_separation",
    }
    causal = bench.naive_causal(lm, ref, r_t, CONFIG, progress=False)
    assert {k[0] for k in causal} == {
        f"{op}_{part}"
        for op in ("ablation", "addition")
        for part in ("effect", "raw", "control_mean", "control_std")
    }
    assert {k[2] for k in causal} == {"fixed", "reextracted"}
    with bench.count_forwards(lm.model, lm.model) as count:  # one module counted once
        lm.model(torch.tensor([[1, 2, 3]]))
    assert count[0] == 1


def test_main_refuses_a_folder_without_a_trajectory(bench, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as err:
        bench.main(["--trajectory", str(tmp_path), "--skip-naive"])
    assert err.value.code == 2
    assert "holds no trajectory.json" in capsys.readouterr().err


def test_one_mode_alone_and_no_naive_without_the_defaults_audit(bench, run, tmp_path) -> None:
    results = bench.run_benchmark(run, tmp_path, CONFIG, progress=False, modes=("no-generate",))
    assert list(results["audits"]) == ["no-generate"] and results["naive"] is None
    assert results["run"] is None and results["lora_step_s"] is None  # a given trajectory


def test_trained_trajectory_times_its_plain_lora_steps(bench, tmp_path, capsys) -> None:
    spec = bench.Run("tiny-chat", "harmful", steps=4, save_every=2)
    folder, took, steps = bench.train_trajectory(tmp_path / "run", spec)
    names = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert names == ["step-000000", "step-000002", "step-000004"]
    # callbacks after steps 1-4: the interval ending at step 3 is the only one without a save
    assert len(steps) == 1 and 0 < steps[0] < took
    results = {
        "train_s": took,
        "trajectory": str(folder),
        "lora_step_s": steps,
        "audits": {},
        "naive": None,
    }
    bench.print_report(results)
    assert "LoRA step (batch 8, median of 1)" in capsys.readouterr().out


def test_main_refuses_an_unknown_mode(bench, capsys) -> None:
    with pytest.raises(SystemExit) as err:
        bench.main(["--modes", "defaults,fast"])
    assert err.value.code == 2 and "--modes" in capsys.readouterr().err
