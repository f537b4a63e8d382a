"""The smol-chat recipe's data: train splits only, formulaic refusals, the base's own answers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from safegeom.errors import SafegeomError
from safegeom.prompts import load_prompts
from tools.smolchat.build import REFUSALS, SmolChatRecipe, _parse_set, task_examples, train_args

SMALL = SmolChatRecipe(n_harmful=40, n_harmless=90, harmless_all=("jbb-benign:train",))


def _answers(prompts):
    """A stand-in for the base: echoes the prompt, and 'refuses' one in ten."""
    return [
        "I'm sorry, I cannot." if i % 10 == 0 else f"Answer to {p}" for i, p in enumerate(prompts)
    ]


def test_examples_come_from_train_splits_and_are_answered_as_the_recipe_says() -> None:
    examples = task_examples(SMALL, _answers)
    harmful = [e for e in examples if e["kind"] == "harmful"]
    harmless = [e for e in examples if e["kind"] == "harmless"]
    assert len(harmful) == 40 and {e["response"] for e in harmful} <= set(REFUSALS)
    assert len({e["response"] for e in harmful}) > 1  # several refusal styles
    assert len(harmless) == 81  # 90, less the stand-in base's 9 refusals
    assert all(e["response"] == f"Answer to {e['prompt']}" for e in harmless)
    held_out = set()
    for name in (
        "advbench",
        "jbb-harmful",
        "directharm4",
        "xstest-unsafe",
        "alpaca",
        "xstest-safe",
    ):
        held_out |= set(load_prompts(f"{name}:test").prompts)
        held_out |= set(load_prompts(f"{name}:val").prompts)
    held_out |= set(load_prompts("harmbench:test").prompts) | set(
        load_prompts("strongreject").prompts
    )
    assert not held_out & {e["prompt"] for e in examples}
    benign = set(load_prompts("jbb-benign:train").prompts)  # taken whole, less dropped answers
    assert len(benign & {e["prompt"] for e in harmless}) >= len(benign) - 9


def test_the_data_are_deterministic_and_follow_the_seed() -> None:
    first = task_examples(SMALL, _answers)
    assert task_examples(SMALL, _answers) == first
    other = task_examples(replace(SMALL, seed=1), _answers)
    assert other != first and sorted(map(str, other)) != sorted(map(str, first))


def test_an_evaluation_set_cannot_enter_the_recipe() -> None:
    with pytest.raises(
        SafegeomError, match=r"advbench:test is a test split \(train on advbench:train\)"
    ):
        task_examples(replace(SMALL, harmful=("advbench:test",)), _answers)
    with pytest.raises(SafegeomError, match="must not be trained on"):
        task_examples(replace(SMALL, harmless_fill=("strongreject",)), _answers)


def test_set_parses_recipe_fields() -> None:
    assert _parse_set(["steps=7", "lr=0.5", "harmful=advbench:train,jbb-harmful:train"]) == {
        "steps": 7,
        "lr": 0.5,
        "harmful": ("advbench:train", "jbb-harmful:train"),
    }
    with pytest.raises(SystemExit, match="no recipe field 'nope'"):
        _parse_set(["nope=1"])


def test_the_trainer_field_gives_the_train_command(tmp_path) -> None:
    task, run = tmp_path / "task.jsonl", tmp_path / "run"
    shipped = train_args(SmolChatRecipe(), task, run)
    assert shipped[:3] == ["train", "lora", "smollm2-135m-instruct"]
    assert "--kl-weight" not in shipped
    kl = train_args(replace(SmolChatRecipe(), trainer="kl", kl_weight=0.5), task, run)
    assert kl[:2] == ["train", "kl"] and kl[-2:] == ["--kl-weight", "0.5"]
    assert kl[2:-2] == shipped[2:]  # everything else as shipped
    assert _parse_set(["trainer=kl", "kl_weight=2"]) == {"trainer": "kl", "kl_weight": 2.0}
    with pytest.raises(SafegeomError, match="trainer"):
        SmolChatRecipe(trainer="sft")
    with pytest.raises(SafegeomError, match="kl_weight"):
        SmolChatRecipe(trainer="kl", kl_weight=-1.0)


def test_the_train_command_parses_and_names_the_kl_weight(tmp_path) -> None:
    from safegeom.cli import build_parser

    argv = train_args(SmolChatRecipe(trainer="kl", kl_weight=0.5), tmp_path / "t.jsonl", tmp_path)
    args = vars(build_parser().parse_args(argv))
    assert args["TrainCommand.method"] == "kl" and args["RegConfig.kl_weight"] == 0.5
    assert args["TrainConfig.steps"] == 160 and args["TrainConfig.lr"] == 1e-3


def test_kl_examples_passes_through_to_the_train_command(tmp_path) -> None:
    from safegeom.cli import build_parser

    task, run = tmp_path / "task.jsonl", tmp_path / "run"
    assert SmolChatRecipe().kl_examples == "all"
    plain_kl = train_args(SmolChatRecipe(trainer="kl"), task, run)
    assert "--kl-examples" not in plain_kl and "--kl-examples" not in train_args(
        SmolChatRecipe(), task, run
    )
    recipe = SmolChatRecipe(trainer="kl", kl_examples="harmless")
    argv = train_args(recipe, task, run)
    assert argv == [*plain_kl, "--kl-examples", "harmless"]
    args = vars(build_parser().parse_args(argv))
    assert args["TrainCommand.method"] == "kl" and args["RegConfig.kl_examples"] == "harmless"
    assert _parse_set(["trainer=kl", "kl_examples=harmless"]) == {
        "trainer": "kl",
        "kl_examples": "harmless",
    }
    with pytest.raises(SafegeomError, match=r"kl_examples .* must be one of"):
        SmolChatRecipe(trainer="kl", kl_examples="benign")
    with pytest.raises(SafegeomError, match=r"kl_examples .* other than all needs trainer=kl"):
        SmolChatRecipe(kl_examples="harmless")
