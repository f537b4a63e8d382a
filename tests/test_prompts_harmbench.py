"""HarmBench and StrongREJECT as bundled prompt sets (issue 22, item 5), and the prompt roles."""

from __future__ import annotations

import csv
import hashlib
import json
import re

import pytest

from safegeom.bundled import BUNDLED_SPECS, CONTEXT_SEPARATOR, _Bundled, _bundled_rows, _targets
from safegeom.errors import NotFoundError, SafegeomError
from safegeom.prompt_roles import (
    EVALUATION_ONLY,
    TARGET_SETS,
    attack_targets,
    check_trainable,
    evaluation_only,
)
from safegeom.prompts import DATA_DIR, PromptSet, combine_prompts, load_prompts, split_counts

HB = DATA_DIR / "harmbench"

# Content hashes (PromptSet.content_hash: prompts and completions) of the new sets, pinned so that
# a change to the data, the contextual format or the target join fails loudly.
PINNED = {
    "harmbench:test": "62fced5e48bca3cc349a6191935896acbab5fb4487b5e95f75bad50e4344968f",
    "harmbench:val": "97caded44fc8c409216152ac2926e4dbfdfabc03de2477eb0b802ebe86b07621",
    "harmbench-contextual:test": "58517a9074a1ff277d53dd36316cdb9d31354f4bfd6fcb7535efdd8b2676fbb6",
    "harmbench-contextual:val": "6ae3f83c13b08d748e420c1b924418c61b21265edbee1824813b86fc7ac4f41c",
    "harmbench-train": "b621c110ae480601aa1a23cfa22132b1a064265c7003451678c73324a3a41471",
    "strongreject": "a32c0d8c386b151be330faf01c60c07b4f2d1b2be890d8142785cd288a2a7539",
    "strongreject-noadvbench": "1632113f4fff0d9b3a1729c8ea4834f3ca0111ccb5abecd3d1871dc308e4a6f8",
}


def _upstream(split: str) -> list[dict[str, str]]:
    """HarmBench's behaviours file of ``split``, read with the standard csv module."""
    path = HB / f"harmbench_behaviors_text_{split}.csv"
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


# --- files and provenance ---------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["harmbench", "strongreject"])
def test_every_file_matches_the_sha256_in_its_provenance(folder: str) -> None:
    text = (DATA_DIR / folder / "PROVENANCE.md").read_text(encoding="utf-8")
    listed: dict[str, str] = {}
    for line in text.splitlines():
        names = re.findall(r"`([\w.-]+\.(?:csv|json))`", line)
        digests = re.findall(r"`([0-9a-f]{64})`", line)
        if names and digests:
            listed[names[0]] = digests[0]
    data = sorted(p.name for p in (DATA_DIR / folder).iterdir() if p.suffix in (".csv", ".json"))
    assert sorted(listed) == data  # every data file is listed, and only those
    for name, digest in listed.items():
        assert hashlib.sha256((DATA_DIR / folder / name).read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("spec", sorted(PINNED))
def test_content_hashes_pinned(spec: str) -> None:
    assert load_prompts(spec).content_hash == PINNED[spec]


# --- HarmBench --------------------------------------------------------------------------------------


def test_harmbench_is_its_own_test_and_val_files_standard_rows_in_file_order() -> None:
    for split, n in (("test", 159), ("val", 41)):
        ps = load_prompts(f"harmbench:{split}")
        rows = [r for r in _upstream(split) if r["FunctionalCategory"] == "standard"]
        assert len(ps) == n
        assert ps.prompts == tuple(r["Behavior"] for r in rows)
        assert ps.categories == tuple(r["SemanticCategory"] for r in rows)
        assert ps.source == f"safegeom/data/harmbench/harmbench_behaviors_text_{split}.csv"
    whole, test = load_prompts("harmbench"), load_prompts("harmbench:test")  # the name alone: test
    assert whole.split is None and whole.name == "harmbench"
    assert (whole.prompts, whole.completions) == (test.prompts, test.completions)


def test_copyright_rows_are_never_loaded() -> None:
    copyright_rows = {
        r["Behavior"]
        for split in ("test", "val")
        for r in _upstream(split)
        if r["FunctionalCategory"] == "copyright"
    }
    assert len(copyright_rows) == 100
    loaded = {
        p
        for name in ("harmbench", "harmbench-contextual")
        for split in ("test", "val")
        for p in load_prompts(f"{name}:{split}")
    }
    assert not any(row in p for row in copyright_rows for p in loaded)


def test_contextual_prompt_is_context_separator_behaviour() -> None:
    assert CONTEXT_SEPARATOR == "\n\n---\n\n"  # HarmBench's DirectRequest / GCG format
    for split, n in (("test", 81), ("val", 19)):
        ps = load_prompts(f"harmbench-contextual:{split}")
        rows = [r for r in _upstream(split) if r["FunctionalCategory"] == "contextual"]
        assert len(ps) == n == len(rows)
        for prompt, row in zip(ps, rows, strict=True):
            assert row["ContextString"].strip()
            assert prompt == row["ContextString"] + "\n\n---\n\n" + row["Behavior"]
    assert (
        load_prompts("harmbench-contextual").prompts
        == load_prompts("harmbench-contextual:test").prompts
    )


def test_every_test_and_val_behaviour_has_its_target() -> None:
    targets = json.loads((HB / "harmbench_targets_text.json").read_text(encoding="utf-8"))
    every_id = {r["BehaviorID"] for split in ("test", "val") for r in _upstream(split)}
    assert len(targets) == 400 and set(targets) == every_id  # copyright rows' too
    for name in ("harmbench", "harmbench-contextual"):
        kind = "standard" if name == "harmbench" else "contextual"
        for split in ("test", "val"):
            ps = load_prompts(f"{name}:{split}")
            ids = [r["BehaviorID"] for r in _upstream(split) if r["FunctionalCategory"] == kind]
            assert attack_targets(ps) == ps.completions == tuple(targets[i] for i in ids)
            assert all(t.startswith("Sure, here") for t in attack_targets(ps))


def test_harmbench_train_has_the_safe_responses() -> None:
    train = load_prompts("harmbench-train")
    assert len(train) == 100 and train.completions == ("Sorry, I can't do that.",) * 100
    assert train.source == "safegeom/data/harmbench/adv_training_behaviors_safe_responses.csv"
    assert load_prompts("harmbench-train:train").prompts == train.prompts
    with (HB / "adv_training_behaviors.csv").open(encoding="utf-8", newline="") as handle:
        behaviours = [r["Behavior"] for r in csv.DictReader(handle)]
    assert train.prompts == tuple(behaviours)  # the two upstream files agree row by row
    assert check_trainable("harmbench-train:train") == load_prompts("harmbench-train:train")


def test_harmbench_train_is_disjoint_from_test_and_val() -> None:
    train = {p.casefold() for p in load_prompts("harmbench-train")}
    every = {r["Behavior"].casefold() for split in ("test", "val") for r in _upstream(split)}
    assert len(train) == 100 and not train & every
    loaded = {p.casefold() for s in ("harmbench:test", "harmbench:val") for p in load_prompts(s)}
    assert not train & loaded
    assert not set(load_prompts("harmbench:test")) & set(load_prompts("harmbench:val"))


# --- StrongREJECT -----------------------------------------------------------------------------------


def test_strongreject_whole_is_its_test_split_and_drops_advbench_on_request() -> None:
    whole = load_prompts("strongreject")
    assert len(whole) == 313 and load_prompts("strongreject:test").prompts == whole.prompts
    assert whole.completions is None and whole.categories is not None
    assert len(set(whole.categories)) == 6
    with (DATA_DIR / "strongreject/strongreject_dataset.csv").open(encoding="utf-8") as handle:
        sources = [r["source"] for r in csv.DictReader(handle)]
    kept = load_prompts("strongreject-noadvbench")
    assert sources.count("AdvBench") == 25 and len(kept) == 288 == len(sources) - 25
    assert kept.prompts == tuple(p for p, s in zip(whole, sources, strict=True) if s != "AdvBench")
    advbench = {p.casefold() for p in load_prompts("advbench")}
    assert sum(p.casefold() in advbench for p in whole) == 25
    assert not any(p.casefold() in advbench for p in kept)


# --- splits a set lacks, bad data -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "harmbench:train",
            "harmbench has no train split: HarmBench's training behaviours are "
            "the separate set harmbench-train (it has harmbench:val, harmbench:test)",
        ),
        ("harmbench-contextual:train", "harmbench-contextual has no train split"),
        (
            "harmbench-train:test",
            "harmbench-train has no test split: it is HarmBench's "
            "adversarial-training set; evaluate on harmbench:test",
        ),
        (
            "strongreject:val",
            "strongreject has no val split: StrongREJECT is evaluation-only; "
            "every prompt is in its test split (it has strongreject:test)",
        ),
        ("strongreject-noadvbench:train", "strongreject-noadvbench has no train split"),
        (
            "harmbench:dev",
            "unknown split 'dev' in 'harmbench:dev'; use harmbench:val or harmbench:test",
        ),
        ("strongreject:dev", "unknown split 'dev' in 'strongreject:dev'; use strongreject:test"),
    ],
)
def test_a_split_the_set_lacks_is_refused_naming_the_fix(spec: str, message: str) -> None:
    with pytest.raises(NotFoundError, match=re.escape(message)):
        load_prompts(spec)


def test_split_counts_report_absent_splits_as_zero() -> None:
    assert split_counts("harmbench") == {"train": 0, "val": 41, "test": 159}
    assert split_counts("strongreject") == {"train": 0, "val": 0, "test": 313}


@pytest.fixture
def bad_spec(monkeypatch: pytest.MonkeyPatch):
    """Put a bundled spec under the name ``harmbench`` for one test, with fresh caches."""

    def install(spec: _Bundled) -> None:
        monkeypatch.setitem(BUNDLED_SPECS, "harmbench", spec)
        _bundled_rows.cache_clear()
        _targets.cache_clear()

    yield install
    _bundled_rows.cache_clear()
    _targets.cache_clear()


def test_a_missing_column_is_named(bad_spec) -> None:
    good = BUNDLED_SPECS["harmbench"]
    bad_spec(_Bundled(**{**good.__dict__, "prompt": "Behaviour"}))
    with pytest.raises(
        SafegeomError,
        match=r"harmbench_behaviors_text_test\.csv' row 0: column "
        r"'Behaviour' is missing or empty",
    ):
        load_prompts("harmbench")


def test_a_missing_target_is_named(bad_spec) -> None:
    good = BUNDLED_SPECS["harmbench"]
    bad_spec(_Bundled(**{**good.__dict__, "targets": (good.targets[0], "SemanticCategory")}))
    with pytest.raises(
        SafegeomError,
        match=r"harmbench_targets_text\.json' has no target for "
        r"SemanticCategory 'misinformation_disinformation' \('harmbench/",
    ):
        load_prompts("harmbench")


# --- roles: evaluation only, attack targets ---------------------------------------------------------


def test_evaluation_only_sets() -> None:
    assert EVALUATION_ONLY == (
        "harmbench",
        "harmbench-contextual",
        "strongreject",
        "strongreject-noadvbench",
    )
    for spec in ("harmbench:val", "harmbench:test", "harmbench-contextual:val", "strongreject"):
        assert evaluation_only(spec) is not None
        with pytest.raises(SafegeomError, match=f"prompt set '{spec}' must not be trained on"):
            check_trainable(spec)
    for spec in ("advbench:train", "gsm8k:train", "xstest-safe:val", "harmbench-train", ["x"]):
        assert evaluation_only(spec) is None
        assert check_trainable(spec) == load_prompts(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("advbench:test", "advbench:test is a test split (train on advbench:train)"),
        ("advbench", "advbench holds its test split (train on advbench:train)"),
        ("gsm8k", "gsm8k holds its test split (train on gsm8k:train)"),
        (
            "harmbench:val",
            "harmbench:val is evaluation-only (HarmBench's val behaviours are for "
            "attack development and selection, its test behaviours for evaluation; train on "
            "harmbench-train)",
        ),
        (
            "strongreject-noadvbench",
            "strongreject-noadvbench is evaluation-only (StrongREJECT is "
            "an evaluation benchmark with no training rows)",
        ),
    ],
)
def test_the_refusal_names_what_to_train_on(spec: str, message: str) -> None:
    assert evaluation_only(spec) == message
    with pytest.raises(SafegeomError, match=re.escape(f"must not be trained on: {message}")):
        check_trainable(spec)


def test_a_test_split_inside_a_sample_or_a_combination_is_still_refused() -> None:
    mixed = combine_prompts(["advbench:train", "harmbench:test"])
    assert evaluation_only(mixed) == evaluation_only("harmbench:test")
    assert evaluation_only(load_prompts("jbb-harmful:test").sample(5)) is not None
    with pytest.raises(SafegeomError, match=r"'advbench:train\+harmbench:test' must not be"):
        check_trainable(mixed)


def test_attack_targets_of_advbench_and_harmbench_alike() -> None:
    assert TARGET_SETS == (
        "advbench",
        "jbb-harmful",
        "jbb-benign",
        "harmbench",
        "harmbench-contextual",
    )
    adv = load_prompts("advbench:test")
    assert attack_targets(adv) == adv.completions
    assert attack_targets("advbench:test")[0].startswith("Sure, here is")
    both = combine_prompts(["advbench:val", "harmbench:val"])
    assert attack_targets(both) == attack_targets("advbench:val") + attack_targets("harmbench:val")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "harmbench-train",
            "no attack targets for 'harmbench-train': it has completions that "
            "are training responses; targets come with advbench, jbb-harmful",
        ),
        ("gsm8k:test", "'gsm8k:test': it has completions that are reference answers"),
        ("strongreject", "no attack targets for 'strongreject': it has no completions"),
        (["write a poem"], "no attack targets for 'inline': it is not a bundled set"),
    ],
)
def test_attack_targets_refuse_sets_without_targets(spec: object, message: str) -> None:
    with pytest.raises(SafegeomError, match=re.escape(message)):
        attack_targets(spec)  # type: ignore[arg-type]
    hand_made = PromptSet("advbench:test", ("a",))
    with pytest.raises(SafegeomError, match="no attack targets for 'advbench:test': its "):
        attack_targets(hand_made)


def test_the_tiny_chat_corpus_refuses_evaluation_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    from tools.tinychat import corpus

    monkeypatch.setattr(corpus, "HARMFUL_SETS", ("advbench:train", "harmbench:test"))
    with pytest.raises(SafegeomError, match="'harmbench:test' must not be trained on"):
        corpus._pool()
    monkeypatch.setattr(corpus, "HARMFUL_SETS", ("harmbench-train",))
    monkeypatch.setattr(corpus, "HARMLESS_SETS", (("jbb-benign:test", 1),))
    with pytest.raises(SafegeomError, match=r"jbb-benign:test is a test split \(train on jbb-"):
        corpus._pool()
