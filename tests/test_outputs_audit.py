"""Audit folders (issue 20, items 2, 4, 5): one audit at a time, only safegeom's files are part of
an audit, and ``--overwrite`` never deletes the user's own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from safegeom.audit import audit, load_audit
from safegeom.cli import main
from safegeom.errors import OutputPathError
from safegeom.outputs import written_files
from tests.audit_fakes import FAKE_CONFIG, install
from tests.audit_helpers import perturbed, run_folder
from tests.test_outputs import HOLD, ROOT
from tests.tiny_models import build_checkpoint


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder: a tiny random Llama and one checkpoint drifting away from it."""
    root = tmp_path_factory.mktemp("outputs_audit")
    base = build_checkpoint(root, "llama")
    return run_folder(root / "run", base, {0: base, 10: perturbed(base, root / "p10", 0.02)})


def test_overwrite_keeps_the_users_checkpoints_file(trajectory, tmp_path, monkeypatch) -> None:
    calls = install(monkeypatch)
    out = tmp_path / "audit"
    (out / "checkpoints").mkdir(parents=True)
    mine = out / "checkpoints" / "mine.txt"
    mine.write_text("mine")
    with pytest.raises(
        OutputPathError,
        match=r"holds files safegeom did not write \(checkpoints/mine.txt\); choose an empty "
        r"folder, or pass --overwrite",
    ):
        audit(trajectory, out, progress=False, **FAKE_CONFIG)
    assert calls.measured == []  # refused before any work
    audit(trajectory, out, progress=False, overwrite=True, **FAKE_CONFIG)
    assert "audit.parquet" in written_files(out)
    assert "checkpoints/mine.txt" not in written_files(out)
    again = audit(trajectory, out, progress=False, overwrite=True, seed=3, **FAKE_CONFIG)
    assert again.manifest["seeds"] == {"seed": 3}  # the old audit was replaced
    assert mine.read_text() == "mine"  # and the user's file kept
    assert load_audit(out).checkpoints == ("base", "step-000010")


def test_a_second_audit_fails_at_once_naming_the_first(
    trajectory, tmp_path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = install(monkeypatch)
    out = tmp_path / "audit"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD.replace('command="train"', 'command="audit"'), str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(
            OutputPathError,
            match=rf"in use by another safegeom run \(pid "
            rf"{proc.pid} on .*, safegeom audit, started ",
        ):
            audit(trajectory, out, progress=False, **FAKE_CONFIG)
        assert main(["audit", str(trajectory), "--out", str(out), "--no-progress"]) == 2
        assert f"(pid {proc.pid} on " in capsys.readouterr().err
        assert calls.measured == [] and calls.built == 0
    finally:
        proc.kill()
        proc.wait()
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == ["half.json"]


def test_folder_commands_refuse_a_folder_of_the_users_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("notes")
    carrier = tmp_path / "refusal.safetensors"
    for argv in (
        ["capture", "tiny-chat", "--prompts", "advbench:val", "--shard-size", "4"],
        ["sweep", "tiny-chat", "--carrier", str(carrier)],
        ["demo"],
    ):
        assert main([*argv, "--out", str(folder)]) == 2
        assert "holds files safegeom did not write (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
