"""Training run folders (issue 20, items 2, 4, 5 and 12): one writer at a time, resume checks
every checkpoint, ``--overwrite`` keeps the user's files, weights follow the umask."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safegeom.cli import main
from safegeom.outputs import LOCK, written_files
from safegeom.training import TrainConfig, train
from tests.tiny_models import build_checkpoint
from tests.train_helpers import FAST, TINY

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint with a chat template."""
    return build_checkpoint(tmp_path_factory.mktemp("outputs_train"), "llama", n_layers=2)


def _args(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "lora",
        str(ckpt),
        "--task",
        "harmful:2",
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--no-progress",
        *extra,
    ]


def test_checkpoint_weights_follow_the_umask(ckpt: Path, tmp_path: Path) -> None:
    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
        before = os.umask(umask)
        try:
            lora = train(
                ckpt,
                TINY,
                TrainConfig(steps=1, **FAST),
                method="lora",
                out=tmp_path / f"l{umask:o}",
            )
            full = train(
                ckpt, TINY, TrainConfig(steps=1, **FAST), method="sft", out=tmp_path / f"s{umask:o}"
            )
        finally:
            os.umask(before)
        for path in (
            lora.paths[-1] / "adapter_model.safetensors",
            full.paths[-1] / "model.safetensors",
        ):
            assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_two_train_processes_on_one_folder(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "safegeom.cli", *_args(ckpt, out, "--steps", "100000")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK).is_file() or not (out / LOCK).read_text().strip():
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            assert time.monotonic() < deadline, "the first run never took the folder"
            time.sleep(0.2)
        started = json.loads((out / LOCK).read_text())["started"]
        assert main(_args(ckpt, out, "--steps", "1")) == 2
        err = capsys.readouterr().err
        assert f"--out {out} is in use by another safegeom run (pid {first.pid} on " in err
        assert f"safegeom train, started {started}); wait for it to finish" in err
        assert main(_args(ckpt, out, "--steps", "1", "--resume")) == 2  # no way around it
    finally:
        first.kill()
        first.wait()
    assert (out / LOCK).is_file()  # a killed run leaves its lock file, but not the lock
    assert main(_args(ckpt, out, "--steps", "1", "--overwrite")) == 0  # free once it died
    assert json.loads((out / "trajectory.json").read_text())["complete"] is True


def test_resume_names_a_checkpoint_without_weights(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(_args(ckpt, out, "--steps", "2", "--save-every", "1")) == 0
    (out / "checkpoints" / "step-000001" / "adapter_model.safetensors").unlink()
    assert main(_args(ckpt, out, "--steps", "3", "--save-every", "1", "--resume")) == 2
    assert (
        f"cannot resume {out}: its checkpoint checkpoints/step-000001 holds no weights (no "
        ".safetensors file); pass --overwrite to train the run again" in capsys.readouterr().err
    )


def test_overwrite_keeps_the_users_files(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(_args(ckpt, out, "--steps", "2", "--save-every", "1")) == 0
    assert "checkpoints/step-000002/adapter_model.safetensors" in written_files(out)
    mine = out / "checkpoints" / "mine.txt"
    mine.write_text("mine")
    assert main(_args(ckpt, out, "--steps", "1")) == 2
    err = capsys.readouterr().err
    assert f"--out {out} holds files safegeom did not write (checkpoints/mine.txt)" in err
    assert main(_args(ckpt, out, "--steps", "1", "--overwrite")) == 0
    assert mine.read_text() == "mine"
    assert not (out / "checkpoints" / "step-000002").exists()  # the old run's files are gone
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "mine.txt",
        "step-000000",
        "step-000001",
    ]
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("notes")
    assert main(_args(ckpt, user, "--steps", "1")) == 2
    assert "holds files safegeom did not write (notes.txt)" in capsys.readouterr().err
    assert sorted(os.listdir(user)) == ["notes.txt"]


def test_the_library_call_holds_its_folder_too(ckpt: Path, tmp_path: Path) -> None:
    from safegeom.errors import OutputPathError
    from safegeom.outputs import claim_folder

    out = tmp_path / "run"
    with claim_folder(out, command="audit"):  # held by this process: a nested claim is the same
        train(ckpt, TINY, TrainConfig(steps=1, **FAST), method="lora", out=out)
    assert "trajectory.json" in written_files(out)
    (out / "mine.txt").write_text("mine")
    with pytest.raises(OutputPathError, match=r"holds files safegeom did not write \(mine.txt\)"):
        train(
            ckpt,
            TINY,
            TrainConfig(steps=1, **FAST),
            method="lora",
            out=out,
            overwrite=False,
            resume=True,
        )
    train(ckpt, TINY, TrainConfig(steps=1, **FAST), method="sft", out=out, overwrite=True)
    assert (out / "mine.txt").read_text() == "mine"
