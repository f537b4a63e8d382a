"""``safegeom train`` with the defence methods: choices, option groups, wrong-method flags, runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safegeom.cli import main
from safegeom.cli.train import TrainCommand, method_groups
from safegeom.errors import ConfigError
from safegeom.training.methods import METHODS
from safegeom.training.trajectory import load_trajectory
from tests.tiny_models import build_checkpoint
from tests.train_helpers import TINY


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (3 layers) with a chat template."""
    return build_checkpoint(tmp_path_factory.mktemp("train_cli"), "llama")


@pytest.fixture(scope="module")
def task_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-example JSONL task."""
    path = tmp_path_factory.mktemp("task") / "task.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": p, "response": r}) + "\n"
            for p, r in zip(TINY.prompts, TINY.responses, strict=True)
        )
    )
    return path


def _args(method: str, ckpt: Path, task: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        method,
        str(ckpt),
        "--task",
        str(task),
        "--out",
        str(out),
        "--steps",
        "2",
        "--save-every",
        "1",
        "--batch-size",
        "2",
        "--no-progress",
        *extra,
    ]


def test_method_choices_are_the_registry(
    ckpt: Path, task_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    groups = method_groups()
    users = {m for group in groups for m in group.methods}
    assert users == set(METHODS) - {"sft", "lora"}
    assert [g.heading for g in groups] == [
        "refusalguard (refusalguard only)",
        "regularisation (kl, adaptive)",
        "weight-space baselines (safe-lora, lox)",
        "r2d2 (r2d2 only)",
    ]
    for group in groups:  # every field's methods are among its group's
        for name in group.cls.__dataclass_fields__:
            assert set(group.methods_of(name)) <= set(group.methods), name
    with pytest.raises(ConfigError, match="unknown method 'nope'; use one of sft, lora, "):
        TrainCommand(method="nope", model="m", task="t", out="o")
    out = tmp_path / "never"
    assert main(_args("nope", ckpt, task_file, out)) == 2
    assert "unknown method 'nope'; use one of sft, lora, refusalguard" in capsys.readouterr().err
    assert not out.exists()


def test_help_lists_every_method_and_the_new_groups(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for method in METHODS:
        assert f"\n  {method} " in text, method
    for title in (
        "refusalguard (refusalguard only):",
        "regularisation (kl, adaptive):",
        "weight-space baselines (safe-lora, lox):",
    ):
        assert title in text
    for option in (
        "--lambda-geom",
        "--guard-layers",
        "--n-calib",
        "--kl-weight",
        "--critic",
        "--judge",
        "--unaligned-base",
    ):
        assert option in text
    assert "docs/methods.md §6" in text and "docs/methods.md §7" in text
    assert "needs --unaligned-base" in text


def test_refusalguard_run_records_its_settings(
    ckpt: Path, task_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rg"
    guard = [
        "--n-calib",
        "2",
        "--calib-batch",
        "2",
        "--guard-layers",
        "1:",
        "--lambda-geom",
        "3",
        "--cone-k",
        "2",
    ]
    assert main([*_args("refusalguard", ckpt, task_file, out, *guard), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["config"]["method"] == "refusalguard"
    assert [c["step"] for c in manifest["checkpoints"]] == [0, 1, 2]
    defence = manifest["config"]["defence"]
    assert defence["method"] == "refusalguard"
    assert defence["lambda_geom"] == 3.0 and defence["cone_k"] == 2 and defence["n_calib"] == 2
    assert defence["layers"] == [1, 2]
    assert load_trajectory(out).config["defence"] == defence


def test_kl_run_records_its_weight_and_prints_one_line(
    ckpt: Path, task_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "kl"
    assert main(_args("kl", ckpt, task_file, out, "--kl-weight", "0.5")) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith(f"wrote 3 checkpoints to {out}")
    traj = load_trajectory(out)
    assert traj.config["defence"] == {"method": "kl", "kl_weight": 0.5}
    assert traj.config["method"] == "kl"


def test_adaptive_with_the_judge_critic(
    ckpt: Path, task_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "adaptive"
    extra = ["--critic", "judge", "--judge", "substring", "--json"]
    assert main(_args("adaptive", ckpt, task_file, out, *extra)) == 0
    defence = json.loads(capsys.readouterr().out)["config"]["defence"]
    assert defence["critic"] == "judge" and defence["judge"] == "substring"
    assert defence["critic_kind"] == "JudgeCritic"
    assert 1.0 <= defence["mean_risk"] <= 5.0


@pytest.mark.parametrize(
    ("method", "extra", "message"),
    [
        ("lora", ["--lambda-geom", "3"], "--lambda-geom is for refusalguard; got method lora"),
        (
            "kl",
            ["--no-readout", "--critic", "judge"],
            "--readout is for refusalguard; --critic is for adaptive; got method kl",
        ),
        ("adaptive", ["--kl-weight", "2"], "--kl-weight is for kl; got method adaptive"),
        (
            "refusalguard",
            ["--unaligned-base", "x"],
            "--unaligned-base is for safe-lora, lox; got method refusalguard",
        ),
        ("sft", ["--calib-harmful", "advbench"], "--calib-harmful is for refusalguard"),
    ],
)
def test_a_flag_of_another_method_is_refused(
    method: str,
    extra: list[str],
    message: str,
    ckpt: Path,
    task_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "never"
    assert main(_args(method, ckpt, task_file, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_bad_method_settings_name_field_and_flag(
    ckpt: Path, task_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never"
    assert main(_args("refusalguard", ckpt, task_file, out, "--lambda-geom", "-1")) == 2
    assert "lambda_geom (--lambda-geom) must be 0 or more, got -1.0" in capsys.readouterr().err
    assert main(_args("kl", ckpt, task_file, out, "--kl-weight", "-2")) == 2
    assert "kl_weight (--kl-weight) must be 0 or more, got -2.0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(_args("adaptive", ckpt, task_file, out, "--critic", "oracle"))
    assert exit_.value.code == 2
    assert "argument --critic: invalid choice: 'oracle'" in capsys.readouterr().err
    assert not out.exists()  # refused before any work
    layers = _args("refusalguard", ckpt, task_file, tmp_path / "rg", "--guard-layers", "7")
    assert main(layers) == 2  # checked against the model once it is loaded
    assert "guard_layers (--guard-layers)" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["safe-lora", "lox"])
def test_weight_space_baselines_need_the_unaligned_base(
    method: str, ckpt: Path, task_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never"
    assert main(_args(method, ckpt, task_file, out)) == 2
    err = capsys.readouterr().err
    assert f"{method} needs --unaligned-base" in err
    assert not out.exists()
