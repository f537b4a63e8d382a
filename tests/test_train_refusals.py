"""``train`` refuses in one line what it would otherwise run wrong or crash on: --resume with
nothing to resume, empty examples, a task file that is not UTF-8, a LoRA target that names no
module (leaving no run folder behind)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from safegeom.cli import main
from safegeom.errors import ConfigError, NonFiniteError, SafegeomError
from safegeom.training.config import TrainConfig
from safegeom.training.posthoc import PosthocConfig
from safegeom.training.runner import train
from safegeom.training.tasks import Task, jsonl_task
from tests.tiny_models import build_checkpoint
from tests.train_helpers import FAST, TINY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("train-refusals"), "llama", n_layers=1)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_resume_into_a_missing_folder_says_nothing_to_resume(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never-made"
    args = ["train", "lora", str(ckpt), "--task", "harmful:2", "--out", str(out), "--resume"]
    assert main([*args, "--steps", "1", "--no-progress"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"--resume: {out} does not exist, so there is nothing to resume" in line
    assert not out.exists()
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(ckpt, "harmful:2", TrainConfig(steps=1, progress=False), out=out, resume=True)
    assert not out.exists()


@pytest.mark.parametrize(
    ("prompts", "responses", "message"),
    [
        (("", " "), ("", ""), "row 0: the prompt is missing or empty"),
        (("Hi.", "Bye."), ("Hello.", "\n"), "row 1: the response is missing or empty"),
    ],
)
def test_empty_examples_are_refused(
    prompts: tuple[str, ...], responses: tuple[str, ...], message: str
) -> None:
    with pytest.raises(SafegeomError, match=message):
        Task(name="t", prompts=prompts, responses=responses)


def test_task_file_with_an_empty_field_names_the_line(tmp_path: Path) -> None:
    file = tmp_path / "t.jsonl"
    rows = [{"prompt": "Hi.", "response": "Hello."}, {"prompt": "", "response": ""}]
    file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(SafegeomError, match=r"t\.jsonl:2: field 'prompt' is empty"):
        jsonl_task(file)


def test_task_file_that_is_not_utf8_is_one_line(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "latin1.jsonl"
    file.write_bytes(
        json.dumps({"prompt": "Caf\u00e9?", "response": "Oui."}, ensure_ascii=False).encode(
            "latin-1"
        )
    )
    with pytest.raises(SafegeomError, match=r"is not UTF-8 text \(byte 15 is b'\\xe9'\)"):
        jsonl_task(file)
    out = tmp_path / "run"
    args = ["train", "lora", str(ckpt), "--task", str(file), "--out", str(out), "--steps", "1"]
    assert main([*args, "--no-progress"]) == 2
    assert "re-save it as UTF-8" in _one_line(capsys.readouterr().err)


def test_task_file_keeps_line_separators_inside_strings(tmp_path: Path) -> None:
    file = tmp_path / "u.jsonl"
    row = {"prompt": "one\u2028two", "response": "ok"}
    file.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert jsonl_task(file).prompts == ("one\u2028two",)


def test_unknown_lora_target_is_one_line_and_leaves_no_folder(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["train", "lora", str(ckpt), "--task", "harmful:2", "--out", str(out), "--steps", "1"]
    assert main([*args, "--lora-targets", "nonexistent_proj", "--no-progress"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--lora-targets nonexistent_proj: the model has no module of that name" in line
    assert "q_proj" in line  # the names it does have
    assert not out.exists()


def test_non_finite_unaligned_base_names_the_option(ckpt: Path, tmp_path: Path) -> None:
    broken = tmp_path / "unaligned"
    shutil.copytree(ckpt, broken)
    weights = load_file(broken / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    weights[name][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    posthoc = PosthocConfig(unaligned_base=str(broken))
    with pytest.raises(NonFiniteError, match=rf"^--unaligned-base {broken}: .* weight {name}"):
        train(
            ckpt,
            TINY,
            TrainConfig(**FAST),
            method="safe-lora",
            settings=posthoc,
            out=tmp_path / "run",
        )
