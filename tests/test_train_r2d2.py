"""R2D2 on tiny-chat through ``safegeom train r2d2``: every loss term falls and the manifest logs
them per step with the pool's attack loss and ASR, the pool is attacked against the current model,
a resumed run equals an uninterrupted one bit for bit (pool included), full weights train too, two
ranks equal one, and bad settings fail with a message naming the flag."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from safegeom.artifacts import sha256_text
from safegeom.cli import main
from safegeom.errors import ConfigError
from safegeom.generation import generate
from safegeom.models import LoadConfig, load_model
from safegeom.training import Trajectory
from safegeom.training import loop as loop_mod
from safegeom.training.methods.r2d2 import ANSWERS_FILE, R2D2Config, away_token_loss
from safegeom.training.methods.r2d2_pool import POOL_FILE, POOL_JSON
from safegeom.training.tasks import get_task
from safegeom.training.trajectory import load_trajectory
from tests.launch_helpers import launch
from tests.train_helpers import saved_weights
from tests.train_parallel_helpers import max_diff

pytestmark = pytest.mark.usefixtures("one_thread")

LR = 1e-2
"""The runs' peak learning rate."""
SMALL = [
    *("--n-behaviours", "3", "--gcg-steps", "1", "--suffix-tokens", "6"),
    *("--search-width", "16", "--top-k", "8", "--attacked-per-step", "2", "--reset-every", "3"),
]
"""Three behaviours, two attacked a step by one GCG step of 16 candidates; a reset at step 3."""
RUN = [
    *("--task", "sentiment:2", "--steps", "5", "--save-every", "2", "--lr", str(LR)),
    *("--batch-size", "2", "--no-progress"),
]
"""Five LoRA steps on the same two harmless examples; checkpoints at steps 0, 2, 4 and 5."""
TERMS = {"away", "toward", "utility", "attack", "pool_loss", "pool_asr"}
"""What every step of the manifest logs beside the loss."""
WEIGHT_ATOL = 0.05 * LR
"""Largest |Δw| allowed between two ranks and one process: 5% of one AdamW step. AdamW divides
each gradient by its RMS + 1e-8, so a coordinate whose gradient nearly cancels (|g| ~ 1e-8) carries
the two summation orders' float32 rounding (~1e-10) into its step at about 1% of the lr: measured
1.75e-4 at lr 1e-2 here, 1.6e-5 at lr 1e-3 with the utility term alone (tests/test_train_ddp.py's
1e-6 holds on its random model, whose gradients do not cancel so)."""


def _args(out: Path, *extra: str) -> list[str]:
    return ["train", "r2d2", "tiny-chat", "--out", str(out), *RUN, *SMALL, *extra]


def _train(out: Path, *extra: str) -> Trajectory:
    """``safegeom train r2d2`` with :data:`RUN` and :data:`SMALL` (``extra`` replaces flags)."""
    assert main(_args(out, *extra)) == 0
    return load_trajectory(out)


def _pool(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The pool saved in a checkpoint folder: its tensors and its JSON record."""
    return load_file(str(folder / POOL_FILE)), json.loads((folder / POOL_JSON).read_text())


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Trajectory:
    """An uninterrupted R2D2 run."""
    return _train(tmp_path_factory.mktemp("r2d2") / "run")


def test_every_loss_term_decreases_and_is_logged_per_step(full: Trajectory) -> None:
    first, last = full.checkpoints[0].terms, full.log[-1]
    for term in ("away", "toward", "utility"):
        assert last[term] < first[term], term
    assert full.losses[0] == pytest.approx(
        0.5 * first["away"] + 0.5 * first["toward"] + first["utility"], rel=1e-5
    )
    assert [row["step"] for row in full.log] == [1, 2, 3, 4, 5]
    assert all(set(row) == {"step", "loss", *TERMS} for row in full.log)
    assert all(0.0 <= row["pool_asr"] <= 1.0 and row["pool_loss"] > 0 for row in full.log)
    assert full.log[-1]["pool_loss"] != full.log[0]["pool_loss"]
    defence = full.config["defence"]
    assert defence["method"] == "r2d2" and defence["gcg_steps"] == 1 and defence["n_pool"] == 3


def test_the_pool_is_saved_with_every_checkpoint_and_moves(full: Trajectory) -> None:
    pools = [_pool(path) for path in full.paths]
    assert [record["step"] for _, record in pools] == [0, 1, 3, 4]  # the last step attacked
    assert pools[0][1]["behaviours"] == pools[-1][1]["behaviours"]
    assert len(pools[0][1]["behaviours"]) == 3 and pools[0][0]["ids"].shape == (3, 6)
    assert not torch.equal(pools[0][0]["ids"], pools[-1][0]["ids"])
    assert not pools[-1][0]["losses"].isnan().any()  # every test case was attacked by step 4


def test_the_pool_is_attacked_against_the_current_model(full: Trajectory, tmp_path: Path) -> None:
    """With every loss weight 0 the model stays the base (AdamW moves nothing without a
    gradient); the same draws then attack another model, so the pools part after step 0. (This
    run's utility is on the task's answers: it differs from the base-answer run's from step 0.)"""
    zero = ("--away-weight", "0", "--toward-weight", "0", "--utility-weight", "0")
    frozen = _train(tmp_path / "frozen", *zero, "--utility-answers", "task")
    assert frozen.checkpoints[0].terms["utility"] != full.checkpoints[0].terms["utility"]
    assert "answers_hash" not in frozen.config["defence"]
    base, moved = saved_weights(frozen.paths[0]), saved_weights(frozen.paths[-1])
    assert all(torch.equal(base[k], moved[k]) for k in base)
    first = [_pool(run.paths[0])[0]["ids"] for run in (frozen, full)]
    assert torch.equal(*first)  # step 0: both attacked the same (untrained) model
    last = [_pool(run.paths[-1])[0]["ids"] for run in (frozen, full)]
    assert not torch.equal(*last)
    assert frozen.log[-1]["pool_loss"] != full.log[-1]["pool_loss"]


def test_utility_trains_on_the_base_models_own_answers(full: Trajectory) -> None:
    saved = json.loads((full.root / "defence" / ANSWERS_FILE).read_text())
    assert saved["prompts"] == list(get_task("sentiment:2").prompts)
    lm = load_model("tiny-chat", LoadConfig(device="cpu"))
    assert saved["answers"] == list(generate(lm, saved["prompts"], max_new_tokens=64))
    defence = full.config["defence"]
    assert defence["utility_answers"] == "base" and defence["answer_tokens"] == 64
    assert defence["answers_hash"] == sha256_text(json.dumps(saved["answers"]))


def test_resume_equals_uninterrupted_including_the_pool(
    full: Trajectory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ctrl-C during step 4 (after the checkpoint of step 2), then ``--resume``."""
    real = loop_mod.optimizer_step

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        if args[6] == 3:  # the 0-based step that would end at step 4
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "cut"
    monkeypatch.setattr(loop_mod, "optimizer_step", interrupted)
    assert main(_args(out)) == 130
    assert "rerun with --resume" in capsys.readouterr().err
    assert load_trajectory(out).steps == (0, 2)
    monkeypatch.setattr(loop_mod, "optimizer_step", real)
    resumed = _train(out, "--resume")
    assert resumed.steps == full.steps and resumed.log == full.log
    for a, b in zip(full.paths, resumed.paths, strict=True):
        first, second = saved_weights(a), saved_weights(b)
        assert all(torch.equal(first[k], second[k]) for k in first)
        (tensors_a, record_a), (tensors_b, record_b) = _pool(a), _pool(b)
        assert record_a == record_b
        assert torch.equal(tensors_a["ids"], tensors_b["ids"])
        assert torch.equal(tensors_a["losses"].nan_to_num(-1), tensors_b["losses"].nan_to_num(-1))


def test_full_weights_train_every_weight(tmp_path: Path) -> None:
    run = _train(tmp_path / "full", "--update", "full", "--steps", "2", "--lr", "1e-4")
    assert (run.paths[-1] / "model.safetensors").is_file()
    assert not (run.paths[-1] / "adapter_config.json").exists()
    assert max_diff(run.paths[0], run.paths[-1]) > 0
    assert run.config["defence"]["update"] == "full" and set(run.log[-1]) >= TERMS


def test_two_ranks_equal_one(full: Trajectory, tmp_path: Path) -> None:
    """``safegeom train r2d2`` over two gloo ranks (each its half of the batch and of the
    attacked behaviours; every rank attacks the same test cases): the one-process run's losses
    and terms within 1e-5, the same pool and the weights within WEIGHT_ATOL at every checkpoint."""
    out = tmp_path / "two"
    (code0, out0, err0), (code1, out1, err1) = launch("safegeom.cli", _args(out), tmp_path)
    assert (code0, code1) == (0, 0), err0[-2000:] + err1[-2000:]
    assert out0.startswith(f"wrote 4 checkpoints to {out} (step 5") and out1 == ""
    two = load_trajectory(out)
    assert two.steps == full.steps
    for a, b in zip(two.paths, full.paths, strict=True):
        assert max_diff(a, b) <= WEIGHT_ATOL
        assert torch.equal(_pool(a)[0]["ids"], _pool(b)[0]["ids"])
    assert two.losses == pytest.approx(full.losses, rel=1e-5)
    for a, b in zip(two.log, full.log, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=2e-6)


def test_bad_settings_fail_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match=r"gcg_steps \(--gcg-steps\) must be at least 1, got 0"):
        R2D2Config(gcg_steps=0)
    with pytest.raises(ConfigError, match=r"reset_fraction \(--reset-fraction\) must lie in"):
        R2D2Config(reset_fraction=1.5)
    with pytest.raises(ConfigError, match=r"utility_answers \(--utility-answers\) must be base or"):
        R2D2Config(utility_answers="judge")  # type: ignore[arg-type]
    empty = tmp_path / "none.jsonl"
    empty.write_text("")
    assert main(_args(tmp_path / "empty", "--behaviours", str(empty))) == 2
    assert "is empty; give at least one prompt" in capsys.readouterr().err
    assert main(_args(tmp_path / "val", "--behaviours", "harmbench:val")) == 2
    assert "must not be trained on" in capsys.readouterr().err
    assert main(["train", "lora", "tiny-chat", "--out", str(tmp_path / "l"), *RUN, *SMALL]) == 2
    assert "--gcg-steps is for r2d2" in capsys.readouterr().err
    assert main(_args(tmp_path / "fsdp", "--update", "full", "--fsdp")) == 2
    assert "--fsdp: r2d2 attacks the model inside every step" in capsys.readouterr().err


def test_away_loss_is_the_unlikelihood_with_its_floor() -> None:
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, -9.0], [1.0, 1.0, 1.0]]])
    labels = torch.tensor([[0, 2, -100]])
    p = logits.softmax(-1)
    got = away_token_loss(logits, labels, None)
    eps = torch.finfo(torch.float32).eps  # p near 1 and p near 0, each to float32 rounding
    assert got[0, 0] == pytest.approx(float(-torch.log1p(-p[0, 0, 0].double())), rel=8 * eps)
    assert got[0, 1] == pytest.approx(float(-torch.log1p(-p[0, 1, 2].double())), rel=8 * eps)
    assert got[0, 2] == 0
    floored = away_token_loss(logits, labels, -5.0)  # log p of label 2 at row 1 is about -9.7
    assert floored[0, 1] == 0 and floored[0, 0] == got[0, 0]
