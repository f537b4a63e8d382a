"""Training's bad inputs and interruptions: one-line errors, consistent checkpoints (issue 10, item 7)."""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from safegeom.cli import main
from safegeom.errors import ConfigError, OutputPathError, TrainingDiverged
from safegeom.training import TrainConfig, load_trajectory, loop, train
from safegeom.training.methods.refusalguard import GuardConfig
from safegeom.training.regularised import RegConfig
from tests.tiny_models import build_checkpoint
from tests.train_helpers import FAST, TINY, saved_weights


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("train-errors"), "llama", n_layers=2)


def test_config_drives_train_and_checks_ranges(ckpt: Path, tmp_path: Path) -> None:
    config = TrainConfig(steps=2, save_every=1, batch_size=2, progress=False)
    a = train(ckpt, TINY, config, method="sft", out=tmp_path / "a")
    b = train(
        ckpt, TINY, TrainConfig(steps=2, save_every=1, **FAST), method="sft", out=tmp_path / "b"
    )
    assert a.steps == b.steps == (0, 1, 2)
    assert all(
        torch.equal(x, y)
        for x, y in zip(
            saved_weights(a.paths[-1]).values(), saved_weights(b.paths[-1]).values(), strict=True
        )
    )
    with pytest.raises(ConfigError, match=r"steps \(--steps\) must be at least 1, got 0"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match=r"lora_dropout \(--lora-dropout\) must lie in \[0, 1\)"):
        train(ckpt, TINY, TrainConfig(lora_dropout=1.5), method="lora", out=tmp_path / "c")
    with pytest.raises(ConfigError, match=r"^config= takes a TrainConfig, got GuardConfig; the"):
        train(ckpt, TINY, GuardConfig(), method="refusalguard", out=tmp_path / "c")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "removed",
    [{"steps": 1}, {"progress": False}, {"dtype": "float32"}, {"guard": GuardConfig()}],
)
def test_removed_keywords_raise_type_error(ckpt: Path, tmp_path: Path, removed: dict) -> None:
    """Settings go in TrainConfig, the dtype in LoadConfig, a method's settings in settings=."""
    name = next(iter(removed))
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}'"):
        train(ckpt, TINY, method="refusalguard", out=tmp_path / "c", **removed)
    assert not (tmp_path / "c").exists()


def test_settings_must_be_the_methods_config(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^settings= takes a GuardConfig for refusalguard, got"):
        train(ckpt, TINY, method="refusalguard", settings=RegConfig(), out=tmp_path / "c")
    with pytest.raises(ConfigError, match=r"^lora takes no settings, got a RegConfig; drop set"):
        train(ckpt, TINY, method="lora", settings=RegConfig(), out=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_out_is_checked_before_work(ckpt: Path, tmp_path: Path) -> None:
    file = tmp_path / "a-file"
    file.write_text("x")
    with pytest.raises(OutputPathError, match=r"--out .*a-file is a file; give a folder"):
        train(ckpt, TINY, TrainConfig(steps=1, **FAST), method="lora", out=file)
    train(
        ckpt, TINY, TrainConfig(steps=1, save_every=1, **FAST), method="lora", out=tmp_path / "run"
    )
    with pytest.raises(OutputPathError, match="already holds a training run; pass --resume"):
        train(
            ckpt,
            TINY,
            TrainConfig(steps=1, save_every=1, **FAST),
            method="lora",
            out=tmp_path / "run",
        )


def test_divergence_stops_naming_the_step(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+: "):
        train(
            ckpt,
            TINY,
            TrainConfig(steps=6, save_every=1, lr=1e6, grad_clip=None, **FAST),
            method="sft",
            out=tmp_path / "nan",
        )
    traj = load_trajectory(tmp_path / "nan")
    assert not traj.complete
    for path in traj.paths:
        assert all(torch.isfinite(t).all() for t in saved_weights(path).values())


def test_cli_divergence_is_one_line(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "train",
        "sft",
        str(ckpt),
        "--task",
        "harmful:4",
        "--out",
        str(tmp_path / "d"),
        "--steps",
        "6",
        "--save-every",
        "2",
        "--batch-size",
        "2",
        "--lr",
        "1e6",
        "--no-progress",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error: training diverged at step" in err and "Traceback" not in err


def test_interrupt_keeps_checkpoints_and_says_resume(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cut"
    args = [
        "train",
        "lora",
        str(ckpt),
        "--task",
        "harmful:4",
        "--out",
        str(out),
        "--steps",
        "4",
        "--save-every",
        "1",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    real = loop.check_finite_weights

    def interrupt_at_3(params, step, traj, lr):  # type: ignore[no-untyped-def]
        if step == 3:
            raise KeyboardInterrupt
        real(params, step, traj, lr)

    monkeypatch.setattr(loop, "check_finite_weights", interrupt_at_3)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "safegeom train: interrupted; rerun with --resume" in err and "Traceback" not in err
    cut = load_trajectory(out)
    assert cut.steps == (0, 1, 2) and not cut.complete
    monkeypatch.setattr(loop, "check_finite_weights", real)
    assert main([*args, "--resume"]) == 0
    assert load_trajectory(out).steps == (0, 1, 2, 3, 4)


def test_truncated_last_checkpoint_resumes_from_the_last_good(ckpt: Path, tmp_path: Path) -> None:
    config = TrainConfig(steps=4, save_every=2, **FAST)
    full = train(ckpt, TINY, config, method="lora", out=tmp_path / "full")

    def stop(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(ckpt, TINY, config, method="lora", out=tmp_path / "cut", callback=stop)
    last = load_trajectory(tmp_path / "cut").paths[-1]
    weights = last / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.warns(
        UserWarning,
        match=r"step-000002 cannot be resumed from \(adapter_model"
        r"\.safetensors: truncated.*resuming from step 0 instead",
    ):
        resumed = train(ckpt, TINY, config, method="lora", out=tmp_path / "cut", resume=True)
    assert resumed.steps == (0, 2, 4) and resumed.complete
    assert all(
        torch.equal(x, y)
        for x, y in zip(
            saved_weights(full.paths[-1]).values(),
            saved_weights(resumed.paths[-1]).values(),
            strict=True,
        )
    )


def test_finished_run_extends_with_more_steps(ckpt: Path, tmp_path: Path) -> None:
    config = TrainConfig(save_every=2, schedule="constant", **FAST)
    run = {"method": "lora", "out": tmp_path / "run"}
    done = train(ckpt, TINY, replace(config, steps=2), **run)
    assert done.complete
    longer = train(ckpt, TINY, replace(config, steps=4), resume=True, **run)
    assert longer.steps == (0, 2, 4) and longer.complete and longer.config["steps"] == 4
    straight = train(ckpt, TINY, replace(config, steps=4), method="lora", out=tmp_path / "straight")
    assert all(
        torch.equal(x, y)
        for x, y in zip(
            saved_weights(straight.paths[-1]).values(),
            saved_weights(longer.paths[-1]).values(),
            strict=True,
        )
    )
    with pytest.raises(ConfigError, match=r"steps \(--steps\) must be at least 4 to resume"):
        train(ckpt, TINY, replace(config, steps=3), resume=True, **run)


def test_an_extended_cosine_run_takes_its_new_schedule_from_the_first_resumed_step(
    ckpt: Path, tmp_path: Path
) -> None:
    """A finished 2-step cosine run ends at lr 0; extended to 4 steps, its step 3 takes the 4-step
    schedule's lr (half the peak), not the finished schedule's 0, so the weights move at once."""
    config = TrainConfig(save_every=1, schedule="cosine", **FAST)
    run = {"method": "lora", "out": tmp_path / "run"}
    train(ckpt, TINY, replace(config, steps=2), **run)
    longer = train(ckpt, TINY, replace(config, steps=4), resume=True, **run)
    assert longer.steps == (0, 1, 2, 3, 4)
    at = dict(zip(longer.steps, longer.paths, strict=True))
    moved = [
        not torch.equal(x, y)
        for x, y in zip(saved_weights(at[2]).values(), saved_weights(at[3]).values(), strict=True)
    ]
    assert any(moved)


def test_outputs_follow_the_umask(ckpt: Path, tmp_path: Path) -> None:
    before = os.umask(0o022)
    try:
        traj = train(
            ckpt,
            TINY,
            TrainConfig(steps=1, save_every=1, **FAST),
            method="lora",
            out=tmp_path / "u",
        )
    finally:
        os.umask(before)
    for path in (
        traj.root / "trajectory.json",
        traj.paths[-1] / "trainer_state" / "state.json",
        traj.paths[-1] / "trainer_state" / "state.safetensors",
    ):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_train_has_the_loading_flags(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "train",
        "lora",
        str(ckpt),
        "--task",
        "harmful:2",
        "--out",
        str(tmp_path / "x"),
        "--steps",
        "1",
        "--no-progress",
    ]
    if not torch.cuda.is_available():
        assert main([*args, "--device", "cuda"]) == 2
        assert "--device cuda: " in capsys.readouterr().err
    assert main([*args, "--device", "cpu", "--trust-remote-code", "--no-allow-pickle"]) == 0
    assert main([*args, "--resume", "--overwrite"]) == 2
    assert "pass either --resume or --overwrite, not both" in capsys.readouterr().err


def test_a_damaged_manifest_is_named(tmp_path: Path) -> None:
    from safegeom.errors import ArtifactError, NotFoundError

    with pytest.raises(NotFoundError, match="holds no training run"):
        load_trajectory(tmp_path)
    (tmp_path / "trajectory.json").write_text("{half")
    with pytest.raises(ArtifactError, match="is not a readable safegeom trajectory manifest"):
        load_trajectory(tmp_path)
    (tmp_path / "trajectory.json").write_text('{"format": "other/1"}')
    with pytest.raises(ArtifactError, match=r"is not a safegeom trajectory manifest \(format"):
        load_trajectory(tmp_path)


def test_a_device_map_is_refused_for_training(ckpt: Path, tmp_path: Path) -> None:
    """Training keeps one whole model per process: a device map is refused before any work."""
    from safegeom.models import LoadConfig

    with pytest.raises(ConfigError, match="training runs one whole model per process"):
        train(
            ckpt,
            TINY,
            TrainConfig(steps=1, save_every=1, **FAST),
            method="sft",
            out=tmp_path / "m",
            load=LoadConfig(device_map="auto"),
        )
    assert not (tmp_path / "m").exists()
