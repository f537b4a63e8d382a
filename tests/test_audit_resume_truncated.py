"""An audit resumed over a per-checkpoint Parquet file that was cut off (a crash, a full disk)
measures that checkpoint again instead of failing on the unreadable file."""

from __future__ import annotations

import pandas as pd
import pytest

from safegeom.audit import audit
from tests.audit_fakes import FAKE_CONFIG, install
from tests.audit_helpers import perturbed
from tests.tiny_models import build_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("truncated")
    base = build_checkpoint(root, "llama")
    return [base] + [perturbed(base, root / f"step-{s:06d}", 0.02 * s, seed=s) for s in (1, 2)]


@pytest.mark.parametrize("keep", [0, 0.5])
def test_truncated_checkpoint_rows_are_measured_again(models, tmp_path, monkeypatch, keep):
    calls = install(monkeypatch)
    first = audit(models, tmp_path / "a", progress=False, **FAKE_CONFIG)
    rows = tmp_path / "a" / "checkpoints" / "step-000002.parquet"
    data = rows.read_bytes()
    rows.write_bytes(data[: int(len(data) * keep)])  # cut off: empty, or half a file
    (tmp_path / "a" / "audit.parquet").unlink()
    calls.measured.clear()
    again = audit(models, tmp_path / "a", progress=False, **FAKE_CONFIG)
    assert calls.measured == [str(models[2])]
    pd.testing.assert_frame_equal(again.table, first.table)
