"""The audit's threads: recorded per phase in the manifest (``sg.load_audit`` reads it back),
restored afterwards, not part of what a rerun must match; a resumed audit names what it skipped
on stderr."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import safegeom as sg
from safegeom.audit import audit
from safegeom.cli import main
from tests.audit_fakes import FAKE_CONFIG, install
from tests.audit_helpers import perturbed
from tests.tiny_models import build_checkpoint

FAST = ["--no-generate", "--families", "geometry", "--no-xstest", "--n-per-class", "4"]
FAST += ["--n-val", "4", "--n-resamples", "100", "--no-progress"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("threads")
    base = build_checkpoint(root, "llama")
    return [base, *(perturbed(base, root / f"step-{s:06d}", 0.02 * s, seed=s) for s in (1, 2))]


def test_threads_per_phase_in_the_manifest_and_restored(models, tmp_path, monkeypatch) -> None:
    install(monkeypatch)
    seen: list[int] = []
    import safegeom.audit.measure as measure_mod

    fake = measure_mod.measure_checkpoint

    def counting(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return fake(*args, **kwargs)

    monkeypatch.setattr(measure_mod, "measure_checkpoint", counting)
    before = torch.get_num_threads()
    result = audit(models[:2], tmp_path / "a", progress=False, threads=2, **FAKE_CONFIG)
    assert torch.get_num_threads() == before and seen == [2, 2]
    assert dict(result.manifest["threads"]) == {"reference": 2, "base": 2, "step-000001": 2}
    assert [c["threads"] for c in result.manifest["checkpoints"]] == [2, 2]
    # a rerun with another count continues the folder (threads are not a setting to match)
    more = audit(models, tmp_path / "a", progress=False, threads=1, **FAKE_CONFIG)
    assert seen == [2, 2, 1]
    recorded = {"reference": 2, "base": 2, "step-000001": 2, "step-000002": 1}
    assert dict(more.manifest["threads"]) == recorded
    assert "threads" not in more.manifest["config"]
    back = sg.load_audit(tmp_path / "a")  # the package face reads the folder back
    assert isinstance(back, sg.AuditResult) and back.root == tmp_path / "a"
    assert dict(back.manifest["threads"]) == recorded
    pd.testing.assert_frame_equal(back.table, more.table)


def test_a_resumed_audit_names_what_it_skipped(models, tmp_path, monkeypatch, capsys) -> None:
    install(monkeypatch)
    first = ["audit", *map(str, models[:2]), "--out", str(tmp_path / "a"), *FAST]
    assert main(first) == 0
    assert "skipped" not in capsys.readouterr().err
    assert main(["audit", *map(str, models), "--out", str(tmp_path / "a"), *FAST]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert lines == [
        f"audit {tmp_path / 'a'}: resuming; skipped 2 checkpoint(s) already measured: "
        "base, step-000001"
    ]
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert [c["label"] for c in manifest["checkpoints"]] == ["base", "step-000001", "step-000002"]
