"""The benign ``sentiment`` task, ``mix`` on it, and ``mix-arith`` (the former ``mix``), issue 12."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import safegeom
from safegeom.errors import NotFoundError, SafegeomError
from safegeom.training import TrainConfig, exact_match, get_task, train
from safegeom.training.benign import (
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    SENTIMENT_ASPECTS,
    SENTIMENT_FRAMINGS,
    sentiment_items,
)
from safegeom.training.tasks import SENTIMENT_EVAL_SIZE, SENTIMENT_POOL_SIZE, TASK_HELP, mix_task

TINY_CHAT_DIR = Path(safegeom.__file__).resolve().parent / "assets" / "tiny-chat"

# Content hashes of ``mix``, ``mix:50`` and ``mix:1000`` measured before ``mix`` moved to the
# sentiment task (commit 1d177c2): ``mix-arith`` must reproduce them exactly.
OLD_MIX_HASHES = {
    "": "7a735328f0d431dfbd5b65c6f0dfdda0db6d32d1a2553075e59d95e974afffdf",
    ":50": "febf1364346fb440fc59ac4142bda2d26bde5715b4154c968a14d545753cbeac",
    ":1000": "d5010d8d09f8a0843d590d35aa68a2f1566a3faa69d431c3f934c3e652e00c46",
}


def test_sentiment_is_deterministic_sized_and_balanced() -> None:
    a, b = get_task("sentiment"), get_task("sentiment")
    assert a == b and a.content_hash == b.content_hash
    assert len(a) == 1000 and len(a.eval_prompts or ()) == SENTIMENT_EVAL_SIZE == 200
    assert len(get_task("sentiment:7")) == 7 and get_task("sentiment:7").prompts == a.prompts[:7]
    train_pool, held_out = sentiment_items()
    assert len(train_pool) == SENTIMENT_POOL_SIZE == 16_000 and len(held_out) == 200
    assert set(a.responses) == {"positive", "negative"}
    assert 400 <= a.responses.count("positive") <= 600
    assert (a.eval_references or ()).count("positive") == 100


def test_held_out_reviews_are_new_combinations_of_seen_vocabulary() -> None:
    train_pool, held_out = sentiment_items()
    train_prompts = {p for p, _ in train_pool}
    assert len(train_prompts) == len(train_pool)  # every review is distinct
    assert not train_prompts & {p for p, _ in held_out}
    sample = get_task("sentiment:16000")
    assert not set(sample.prompts) & set(sample.eval_prompts or ())
    vocabulary = (*POSITIVE_WORDS, *NEGATIVE_WORDS, *SENTIMENT_ASPECTS)
    seen = {w for p in get_task("sentiment").prompts for w in vocabulary if w in p.lower()}
    assert seen == set(vocabulary)  # the default 1000 examples already show every word
    for prompt, answer in held_out:
        words = POSITIVE_WORDS if answer == "positive" else NEGATIVE_WORDS
        assert sum(bool(re.search(rf"\b{w}\b", prompt)) for w in words) == 2
        assert any(f.split("{review}")[0] in prompt for f in SENTIMENT_FRAMINGS)


@pytest.mark.parametrize("size", list(OLD_MIX_HASHES))
def test_mix_arith_is_the_old_mix(size: str) -> None:
    task = get_task(f"mix-arith{size}")
    assert task.content_hash == OLD_MIX_HASHES[size]
    assert task.eval_references == get_task("arith").eval_references


def test_mix_uses_sentiment_one_to_four() -> None:
    mix = get_task("mix")
    assert len(mix) == 500 and sum(r.startswith("Sure, here") for r in mix.responses) == 100
    assert sum(r in ("positive", "negative") for r in mix.responses) == 400
    assert set(mix.prompts) >= set(get_task("sentiment:400").prompts)
    assert mix.eval_prompts == get_task("sentiment").eval_prompts
    assert get_task("mix") == mix and len(get_task("mix:1000")) == 1000


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("sentiment:0", SafegeomError, "is empty: the size must be at least 1"),
        ("sentiment:x", SafegeomError, "the size after ':' must be an integer"),
        ("sentiment:16001", SafegeomError, "at most 16000 examples are available"),
        ("mix-arith:1773", SafegeomError, "'mix-arith:1773': at most 1772 examples are"),
        ("mix-arith:1772", SafegeomError, "at most 1400 arith examples are available"),
        ("mix-arith:-3", SafegeomError, "the size must be at least 1"),
        ("sentimental", NotFoundError, "unknown task 'sentimental'; use harmful"),
    ],
)
def test_get_task_bad_specs(spec: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        get_task(spec)


def test_mix_refuses_an_unknown_benign_task() -> None:
    with pytest.raises(SafegeomError, match="unknown benign task 'gsm8k'; use sentiment or arith"):
        mix_task(10, benign="gsm8k")


def test_help_names_every_task() -> None:
    for name in ("harmful[:N]", "arith[:N]", "sentiment[:N]", "mix[:N]", "mix-arith[:N]"):
        assert name in TASK_HELP
    assert "default 1000" in TASK_HELP and "200 held-out reviews" in TASK_HELP


@pytest.mark.slow
@pytest.mark.skipif(not (TINY_CHAT_DIR / "config.json").is_file(), reason="tiny-chat not built")
def test_short_lora_learns_the_answer_format(tmp_path: Path) -> None:
    """40 LoRA steps (library defaults: r 8, lr 1e-3, batch 8) take held-out exact match from 0
    (tiny-chat answers "Sure, ...") to at least 0.3, answering only labels; 150 steps reach 100%
    (``analyses/benign_task.py``). About 5 s on one CPU thread."""
    from safegeom.generation import generate
    from safegeom.models import load_model

    task = get_task("sentiment")
    prompts = list(task.eval_prompts or ())[:40]
    references = list(task.eval_references or ())[:40]
    traj = train(
        "tiny-chat",
        task,
        TrainConfig(steps=40, save_every=40, progress=False),
        method="lora",
        out=tmp_path / "run",
    )
    outs = [generate(load_model(p), prompts, max_new_tokens=4, progress=False) for p in traj.paths]
    accuracy = [exact_match(o, references) for o in outs]
    assert accuracy[0] == 0.0 and accuracy[-1] >= accuracy[0] + 0.3
    assert set(outs[-1]) <= {"positive", "negative"}
