"""Resuming an audit: reruns skip what is done, changed settings are refused, and an audit killed
with SIGKILL mid-checkpoint and rerun gives the table of an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

import safegeom.audit.measure as measure_mod
import safegeom.audit.reference as reference_mod
from safegeom.audit import audit, load_audit
from safegeom.errors import ConfigError
from tests.audit_fakes import FAKE_CONFIG, install
from tests.audit_helpers import perturbed
from tests.tiny_models import build_checkpoint

ROOT = Path(__file__).resolve().parent.parent
REAL = {
    "n_per_class": 4,
    "n_val": 4,
    "n_behaviour": 2,
    "generate": False,
    "xstest": False,
    "families": ("geometry", "causal"),
    "n_resamples": 100,
}
"""A small real audit (geometry and causal rows) of a tiny random Llama."""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A tiny random Llama and three checkpoints drifting away from it (BASE CKPT CKPT CKPT)."""
    root = tmp_path_factory.mktemp("resume")
    base = build_checkpoint(root, "llama")
    return [base] + [perturbed(base, root / f"step-{s:06d}", 0.02 * s, seed=s) for s in (1, 2, 3)]


def test_rerun_recomputes_nothing(models, tmp_path, monkeypatch):
    calls = install(monkeypatch)
    first = audit(models, tmp_path / "a", progress=False, **FAKE_CONFIG)
    assert len(calls.measured) == 4
    again = audit(models, tmp_path / "a", progress=False, **FAKE_CONFIG)
    assert len(calls.measured) == 4 and calls.built == 1  # nothing measured or built again
    pd.testing.assert_frame_equal(again.table, first.table)


def test_a_missing_checkpoint_file_is_all_that_is_recomputed(models, tmp_path, monkeypatch):
    calls = install(monkeypatch)
    first = audit(models, tmp_path / "a", progress=False, **FAKE_CONFIG)
    (tmp_path / "a" / "checkpoints" / "step-000002.parquet").unlink()
    (tmp_path / "a" / "audit.parquet").unlink()
    calls.measured.clear()
    again = audit(models, tmp_path / "a", progress=False, **FAKE_CONFIG)
    assert calls.measured == [str(models[2])]
    pd.testing.assert_frame_equal(again.table, first.table)


def test_changed_config_is_refused_unless_overwrite(models, tmp_path, monkeypatch):
    calls = install(monkeypatch)
    audit(models, tmp_path / "a", progress=False, **FAKE_CONFIG)
    with pytest.raises(ConfigError, match=r"other settings \(seed differ\); pass --overwrite"):
        audit(models, tmp_path / "a", progress=False, seed=1, **FAKE_CONFIG)
    with pytest.raises(ConfigError, match=r"other settings \(dtype differ\)"):
        from safegeom.models.loading import LoadConfig

        audit(
            models, tmp_path / "a", load=LoadConfig(dtype="bfloat16"), progress=False, **FAKE_CONFIG
        )
    assert len(calls.measured) == 4
    result = audit(models, tmp_path / "a", progress=False, overwrite=True, seed=1, **FAKE_CONFIG)
    assert len(calls.measured) == 8 and result.manifest["seeds"] == {"seed": 1}


_KILLED = """
import sys, time, torch
from pathlib import Path
torch.set_num_threads(1)
import safegeom.audit.measure as m
from safegeom.audit import audit
real, n = m.measure_checkpoint, []
def slow(*args, **kwargs):
    n.append(1)
    if len(n) == 2:  # mid-checkpoint: the base is done, the first checkpoint is being measured
        Path(sys.argv[1], "started-second").write_text("x")
        time.sleep(600)
    return real(*args, **kwargs)
m.measure_checkpoint = slow
audit(sys.argv[2:], Path(sys.argv[1], "audit"), progress=False, **{real_config})
"""


def test_sigkill_mid_checkpoint_then_rerun_equals_uninterrupted(models, tmp_path, monkeypatch):
    script = textwrap.dedent(_KILLED).replace("{real_config}", repr(REAL))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path), *map(str, models)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not (tmp_path / "started-second").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the audit never reached its second checkpoint: {proc.stderr.read()!r}")
        time.sleep(0.1)
    assert (tmp_path / "audit" / "checkpoints" / "base.parquet").is_file()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "audit" / "audit.parquet").exists()

    import torch

    torch.set_num_threads(1)
    measured: list[str] = []
    built: list[int] = []
    real_measure, real_build = measure_mod.measure_checkpoint, reference_mod.build_reference

    def counting(lm, *args, **kwargs):
        measured.append(lm.name)
        return real_measure(lm, *args, **kwargs)

    def counting_build(*args, **kwargs):
        built.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(measure_mod, "measure_checkpoint", counting)
    monkeypatch.setattr(reference_mod, "build_reference", counting_build)
    resumed = audit(models, tmp_path / "audit", progress=False, **REAL)
    assert measured == [str(p) for p in models[1:]]  # the finished base was not recomputed
    assert built == []  # the reference was loaded back, not rebuilt
    fresh = audit(models, tmp_path / "fresh", progress=False, **REAL)
    assert len(measured) == 3 + 4
    pd.testing.assert_frame_equal(resumed.table, fresh.table, check_exact=False, rtol=1e-9)
    pd.testing.assert_frame_equal(load_audit(tmp_path / "audit").table, resumed.table)
    hashes = [c["weight_hash"] for c in resumed.manifest["checkpoints"]]
    assert hashes == [c["weight_hash"] for c in fresh.manifest["checkpoints"]]


def test_a_longer_trajectory_adds_only_its_new_checkpoints(models, tmp_path, monkeypatch):
    calls = install(monkeypatch)
    audit(models[:2], tmp_path / "a", progress=False, **FAKE_CONFIG)
    longer = audit(models, tmp_path / "a", progress=False, **FAKE_CONFIG)
    assert calls.measured == [str(p) for p in models[:2]] + [str(p) for p in models[2:]]
    assert longer.steps == (0, 1, 2, 3) and len(longer.manifest["checkpoints"]) == 4
