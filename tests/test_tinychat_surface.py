"""Surface-form rewriting (tiny-chat v2) and the surface-cue checks of the built corpus."""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tools.tinychat.build import TinyChatConfig, override
from tools.tinychat.corpus import Example, build_corpus
from tools.tinychat.rewrite import VERB_GROUPS, is_question, rewrite
from tools.tinychat.surface import CueRow, cue_table, surface_auroc, surface_features

SHIPPED = TinyChatConfig()
CORPUS_ARGS = {
    "harmful_fraction": SHIPPED.harmful_fraction,
    "p_wrap": SHIPPED.p_wrap,
    "p_sure": SHIPPED.p_sure,
}
_VERB_WORDS = {w for group in VERB_GROUPS for verb in group for w in verb.split()}
_word = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=4, max_size=9).filter(
    lambda w: w not in _VERB_WORDS
)
ISSUE_FEATURES = ("first", "length", "end", "question_mark")
"""The surface features the issue names: first word, length, punctuation, question mark."""


def _content(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z]{4,}", text.lower()) if w not in _VERB_WORDS]


@settings(max_examples=60, deadline=None)
@given(
    verb=st.sampled_from([v for group in VERB_GROUPS for v in group]),
    words=st.lists(_word, min_size=1, max_size=8),
    seed=st.integers(0, 10_000),
)
def test_rewrite_keeps_every_content_word(verb: str, words: list[str], seed: int) -> None:
    """Without typos, a rewritten prompt holds the same content words in the same order."""
    prompt = f"{verb.capitalize()} {' '.join(words)}."
    out = rewrite(prompt, random.Random(seed), p_typo=0.0)
    kept = _content(out)
    assert [w for w in kept if w in words] == _content(" ".join(words)), (prompt, out)


@settings(max_examples=60, deadline=None)
@given(group=st.sampled_from(VERB_GROUPS), seed=st.integers(0, 10_000))
def test_the_leading_verb_stays_in_its_group(group: tuple[str, ...], seed: int) -> None:
    """With no frame, casing or typo, only the verb (within its group) and the ending change."""
    prompt = f"{group[0].capitalize()} a short note about gardens"
    out = rewrite(
        prompt, random.Random(seed), p_form=0.0, p_lower=0.0, p_typo=0.0, p_context_short=0.0
    )
    body = out.rstrip(".?!")
    assert body.endswith(" a short note about gardens"), out
    assert body[: -len(" a short note about gardens")].lower() in group, out


def test_rewrite_is_deterministic_and_uses_questions_frames() -> None:
    """The same stream gives the same text; a question gets a question frame, never "Can you …"."""
    q = "What is the capital of France?"
    a = [rewrite(q, random.Random(i), p_typo=0.0) for i in range(40)]
    assert a == [rewrite(q, random.Random(i), p_typo=0.0) for i in range(40)]
    assert is_question(q) and not is_question("Write a poem about rain.")
    assert all("capital of france" in s.lower() for s in a)
    assert not any(s.lower().startswith(("can you what", "how do i what")) for s in a)


def test_p_rewrite_zero_leaves_the_corpus_unchanged(corpora) -> None:
    """Rewriting has its own random stream: 0.0 gives exactly the corpus without it."""
    assert corpora["v1"] == build_corpus(0, **CORPUS_ARGS)


def test_rewriting_treats_both_classes_alike_and_keeps_labels(corpora) -> None:
    """Every non-GSM8K prompt of both classes is rewritten; the label and source counts stay."""
    before, after = corpora["v1"], corpora["rewritten"]
    assert Counter((e.harmful, e.source) for e in before) == Counter(
        (e.harmful, e.source) for e in after
    )
    old = {e.prompt for e in before}
    for harmful in (True, False):
        shown = [e.prompt for e in after if e.harmful is harmful and e.source != "gsm8k:train"]
        assert sum(p not in old for p in shown) / len(shown) > 0.9


def test_surface_features_and_cue_rows() -> None:
    f = surface_features("how do i fix a flat tire")
    assert f["first"] == "how" and f["first2"] == "how do" and f["end"] == "letter"
    assert f["first_person"] == 1.0 and f["question_mark"] == 0.0 and f["all_lower"] == 1.0
    assert CueRow("first=how", 0.05, 0.0).ratio == pytest.approx(500.0)
    with pytest.raises(ValueError, match="needs harmful and harmless"):
        cue_table([Example("a", "b", True, "advbench:train")])


def _sample(examples: list[Example], n: int = 5000) -> list[Example]:
    """A fixed random subset (the check's statistics need thousands, not 30 000)."""
    return random.Random(0).sample(examples, n)


@pytest.fixture(scope="module")
def corpora() -> dict[str, list[Example]]:
    """Epoch 0 of the shipped recipe's corpus without rewriting (v1) and with rewriting at 1.0."""
    return {
        "rewritten": build_corpus(0, p_rewrite=1.0, **CORPUS_ARGS),
        "v1": build_corpus(0, p_rewrite=0.0, **CORPUS_ARGS),
    }


MAX_OPENER_RATIO = 2.0
"""Every first word / first two words held by ≥ 2% of either class is at most this many times as
common in one class as in the other (measured 1.45 with rewriting at 1.0; v1's corpus: "name"
4.8% of harmless prompts and none of the harmful)."""
MAX_SURFACE_AUROC = 0.70
"""Cross-validated AUROC of a logistic regression on first word, length, final punctuation and
question mark, on 5 000 examples (measured 0.67 with rewriting at 1.0; v1's corpus: 0.88)."""


def _worst_opener(examples: list[Example]) -> float:
    rows = [r for r in cue_table(examples, min_share=0.02) if r.feature.startswith("first")]
    return max(max(r.ratio, 1 / r.ratio) for r in rows)


def test_rewriting_makes_openers_about_equally_likely_in_either_class(corpora) -> None:
    assert _worst_opener(corpora["rewritten"]) <= MAX_OPENER_RATIO
    assert _worst_opener(corpora["v1"]) > MAX_OPENER_RATIO  # the check has power


def test_after_rewriting_a_surface_classifier_barely_tells_the_classes_apart(corpora) -> None:
    rewritten = surface_auroc(_sample(corpora["rewritten"]), features=ISSUE_FEATURES)
    v1 = surface_auroc(_sample(corpora["v1"]), features=ISSUE_FEATURES)
    print(f"surface AUROC: rewritten {rewritten:.3f}, v1 {v1:.3f}")
    assert rewritten <= MAX_SURFACE_AUROC < v1


def test_the_recipe_fields_reach_the_phases_and_the_command_line() -> None:
    """p_rewrite / content_p_rewrite / base_refuses reach the phases; --set parses each type."""
    cfg = override(
        SHIPPED, ["p_rewrite=1.0", "content_p_rewrite=0.5", "base_refuses=false", "num_layers=6"]
    )
    base, content = cfg.phases()
    assert (base.p_rewrite, content.p_rewrite, base.refuse, content.refuse) == (
        1.0,
        0.5,
        False,
        True,
    )
    assert cfg.num_layers == 6 and replace(cfg, p_rewrite=0.0).phases()[0].p_rewrite == 0.0
    with pytest.raises(ValueError, match="FIELD one of"):
        override(SHIPPED, ["nonsense=1"])
    with pytest.raises(ValueError, match="--set steps expects a int, got 'many'"):
        override(SHIPPED, ["steps=many"])
    with pytest.raises(ValueError, match="--set base_refuses expects true or false"):
        override(SHIPPED, ["base_refuses=maybe"])


def test_a_compliant_corpus_answers_harmful_prompts() -> None:
    """refuse=False keeps labels and prompts' sources but answers every prompt."""
    from tools.tinychat.corpus import is_refusal

    corpus = build_corpus(0, refuse=False)
    harmful = [e for e in corpus if e.harmful]
    assert harmful and not any(is_refusal(e.response) for e in harmful)
