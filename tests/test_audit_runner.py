"""The audit runner: the table and manifest of a 3-checkpoint trajectory, load_audit, --out."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from safegeom.audit import AuditResult, audit, load_audit
from safegeom.audit.schema import COLUMNS
from safegeom.errors import ArtifactError, NotFoundError, OutputPathError
from tests.audit_fakes import FAKE_CONFIG, install
from tests.audit_helpers import perturbed, run_folder
from tests.tiny_models import build_checkpoint


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder: a tiny random Llama and three checkpoints drifting away from it."""
    root = tmp_path_factory.mktemp("traj")
    base = build_checkpoint(root, "llama")
    steps = {0: base}
    for i, step in enumerate((10, 20, 30)):
        steps[step] = perturbed(base, root / f"p{step}", scale=0.02 * (i + 1), seed=step)
    return run_folder(root / "run", base, steps)


def test_table_and_manifest_of_a_three_checkpoint_trajectory(trajectory, tmp_path, monkeypatch):
    calls = install(monkeypatch)
    config = {**FAKE_CONFIG, "families": ("geometry", "behaviour")}
    result = audit(trajectory, tmp_path / "audit", progress=False, **config)
    assert isinstance(result, AuditResult)
    assert result.checkpoints == ("base", "step-000010", "step-000020", "step-000030")
    assert result.steps == (0, 10, 20, 30)
    assert list(result.table.columns) == list(COLUMNS)
    assert list(result.table["step"]) == sorted(result.table["step"])  # step order
    assert len(calls.measured) == 4 and calls.built == 1
    manifest = result.manifest
    assert manifest["complete"] is True
    assert set(manifest["versions"]) == {"torch", "transformers", "peft", "safegeom"}
    assert "git_sha" in manifest and manifest["seeds"] == {"seed": 0}
    assert manifest["config"]["families"] == (
        "geometry",
        "behaviour",
    )  # read-only: lists are tuples
    hashes = [c["weight_hash"] for c in manifest["checkpoints"]]
    assert len(set(hashes)) == 4 and manifest["base_hash"] == hashes[0]
    assert all({"load", "capture"} <= set(c["seconds"]) for c in manifest["checkpoints"])
    assert manifest["forward_passes"] == 12
    assert manifest["inputs"]["task"] == "arith:8"
    out = tmp_path / "audit"
    assert (out / "reference" / "reference.json").is_file()
    assert all((out / "checkpoints" / f"{c}.parquet").is_file() for c in result.checkpoints)


def test_load_audit_round_trip_and_wide_view(trajectory, tmp_path, monkeypatch):
    install(monkeypatch)
    result = audit(trajectory, tmp_path / "audit", progress=False, **FAKE_CONFIG)
    back = load_audit(tmp_path / "audit")
    pd.testing.assert_frame_equal(back.table, result.table)
    assert dict(back.manifest) == dict(result.manifest)
    assert back.checkpoints == result.checkpoints
    wide = back.wide("step-000020")
    assert list(wide.columns) == ["layer", "carrier", "source", "prompts", "cosine_to_base", "asr"]
    assert len(wide) == 4  # three layers and one behaviour row
    pd.testing.assert_frame_equal(back.wide(20), wide)
    with pytest.raises(ValueError, match="no checkpoint 'nope' in this audit; it has base"):
        back.wide("nope")
    with pytest.raises(TypeError):
        back.manifest["config"]["seed"] = 1  # read-only


def test_load_audit_refuses_a_non_audit_folder(tmp_path, trajectory):
    with pytest.raises(NotFoundError, match="no audit folder"):
        load_audit(tmp_path / "missing")
    with pytest.raises(ArtifactError, match=r"holds no audit: manifest.json is missing"):
        load_audit(trajectory)
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(ArtifactError, match="is not a safegeom audit manifest"):
        load_audit(tmp_path)


def test_out_is_checked_before_any_work(trajectory, tmp_path, monkeypatch):
    calls = install(monkeypatch)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="is a file; give a folder"):
        audit(trajectory, tmp_path / "file", progress=False, **FAKE_CONFIG)
    with pytest.raises(OutputPathError, match=r"is also an input .*; choose another --out"):
        audit(trajectory, trajectory, progress=False, **FAKE_CONFIG)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "trajectory.json").write_text((trajectory / "trajectory.json").read_text())
    with pytest.raises(OutputPathError, match="holds a training run; give the audit its own"):
        audit(trajectory, tmp_path / "run", progress=False, overwrite=True, **FAKE_CONFIG)
    assert calls.measured == [] and calls.built == 0


def test_bad_prompt_set_fails_before_any_model_loads(trajectory, tmp_path, monkeypatch):
    calls = install(monkeypatch)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"--harmless: prompt file .* is empty"):
        audit(trajectory, tmp_path / "a", progress=False, harmless=(str(empty),), **FAKE_CONFIG)
    assert calls.measured == [] and not (tmp_path / "a" / "manifest.json").exists()


def test_peft_adapter_trajectory_equals_the_merged_checkpoints(tmp_path):
    """Applied and merged adapters differ only by float32 rounding: tolerance 1e-4 absolute,
    1e-3 relative, on every number of a real geometry-and-causal audit."""
    from tests.audit_helpers import adapter, merged

    base = build_checkpoint(tmp_path, "llama")
    adapters = [adapter(base, tmp_path / "a" / f"step-{s:06d}", 0.1 * s, seed=s) for s in (1, 2)]
    folded = [merged(a, base, tmp_path / "m" / a.name) for a in adapters]
    small = {
        "n_per_class": 4,
        "n_val": 4,
        "generate": False,
        "xstest": False,
        "families": ("geometry", "causal"),
        "n_resamples": 100,
    }
    applied = audit([base, *adapters], tmp_path / "audit-a", progress=False, **small)
    full = audit([base, *folded], tmp_path / "audit-m", progress=False, **small)
    assert [c["form"] for c in applied.manifest["checkpoints"]] == ["full", "adapter", "adapter"]
    assert applied.checkpoints == full.checkpoints == ("base", "step-000001", "step-000002")
    pd.testing.assert_frame_equal(
        applied.table, full.table, check_exact=False, rtol=1e-3, atol=1e-4
    )
    assert applied.wide("step-000002")["direction_drift"].max() > 1e-3  # the adapters moved it


def test_real_geometry_audit_of_a_three_checkpoint_trajectory(trajectory, tmp_path):
    small = {
        "n_per_class": 4,
        "n_val": 4,
        "generate": False,
        "xstest": False,
        "families": ("geometry",),
        "n_resamples": 100,
    }
    result = audit(trajectory, tmp_path / "audit", progress=False, **small)
    table = result.table
    assert result.steps == (0, 10, 20, 30)
    for metric in ("cosine_to_base", "direction_drift", "grassmann_distance", "hr_coupling"):
        assert set(table[table["metric"] == metric]["step"]) == {0, 10, 20, 30}, metric
    base = result.wide("base")
    base = base[base["source"].ne("floor").fillna(True)]  # the noise floors: rows of their own
    assert base["cosine_to_base"].dropna().sub(1).abs().max() < 1e-9
    assert base["direction_drift"].dropna().abs().max() < 1e-9
    drift = {
        s: result.wide(s).query("source == 'reextracted'")["direction_drift"] for s in (10, 30)
    }
    assert drift[30].max() > drift[10].min()


def test_audit_of_a_trained_lora_run_folder(tmp_path):
    """A run folder written by safegeom.training (LoRA adapters), audited with behaviour on: the
    run's own task gives task_accuracy."""
    from safegeom.training import TrainConfig, train

    base = build_checkpoint(tmp_path, "llama")
    run = tmp_path / "run"
    train(
        base,
        "arith:8",
        TrainConfig(steps=4, save_every=2, lr=0.05, progress=False, batch_size=4),
        method="lora",
        out=run,
    )
    small = {
        "n_per_class": 4,
        "n_val": 4,
        "n_behaviour": 2,
        "max_new_tokens": 4,
        "xstest": False,
        "families": ("geometry", "behaviour"),
        "n_resamples": 100,
        "behaviour_harmful": ("advbench:test",),
    }
    result = audit(run, tmp_path / "audit", progress=False, **small)
    assert result.checkpoints == ("base", "step-000002", "step-000004")
    assert [c["form"] for c in result.manifest["checkpoints"]] == ["full", "adapter", "adapter"]
    assert result.manifest["inputs"]["task"] == "arith:8"
    metrics = set(result.table["metric"])
    assert {"task_accuracy", "asr", "cosine_to_base"} <= metrics
    assert set(result.table[result.table["metric"] == "task_accuracy"]["step"]) == {0, 2, 4}
