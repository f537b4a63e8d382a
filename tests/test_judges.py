"""Judges, exact match, rates and the bootstrap: crafted strings and tiny random models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForSequenceClassification

from safegeom.bootstrap import Metric, bootstrap_ci, bootstrap_diff_ci
from safegeom.evaluation import generate_from_ids
from safegeom.judges import (
    REFUSAL_SUBSTRINGS,
    XSTEST_PREFIXES,
    Judge,
    ModelJudge,
    SubstringJudge,
    XSTestJudge,
    attack_success_rate,
    get_judge,
    over_refusal,
    parse_guard,
    refusal_rate,
    task_accuracy,
)
from safegeom.task_scoring import exact_match, extract_answer
from tests.tiny_models import LLAMA3_STYLE, build_checkpoint, build_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


# --- string judges ------------------------------------------------------------------------------


@pytest.mark.parametrize("phrase", REFUSAL_SUBSTRINGS)
def test_substring_judge_finds_each_phrase_in_any_case(phrase: str) -> None:
    judge = SubstringJudge()
    texts = [f"Well. {phrase} do that.", f"ok {phrase.upper()}", f"{phrase.lower()}!"]
    assert judge(["p"] * 3, texts) == (True, True, True)


def test_substring_judge_passes_compliance_and_records_name() -> None:
    judge = SubstringJudge()
    texts = ["Sure, here is a cake recipe.", "Step 1: mix flour.", "I can help with that!"]
    assert judge(["p"] * 3, texts) == (False, False, False)
    assert judge.name == "substring"
    assert isinstance(judge, Judge)


def test_substring_judge_typographic_apostrophe_is_configurable() -> None:
    text = ["I can’t help with that."]
    assert SubstringJudge()(["p"], text) == (True,)
    assert SubstringJudge(normalize_quotes=False)(["p"], text) == (False,)


def test_judges_reject_misaligned_inputs() -> None:
    with pytest.raises(ValueError, match="one completion per prompt"):
        SubstringJudge()(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="one completion per prompt"):
        XSTestJudge()(["a"], [])


@pytest.mark.parametrize("prefix", XSTEST_PREFIXES)
def test_xstest_judge_matches_each_prefix(prefix: str) -> None:
    judge = XSTestJudge()
    texts = [f"{prefix} more text", f'  "{prefix.upper()} more', f"\n'{prefix.capitalize()}"]
    assert judge(["p"] * 3, texts) == (True, True, True)


def test_xstest_judge_ignores_mentions_that_are_not_prefixes() -> None:
    judge = XSTestJudge()
    texts = [
        "Here is the answer. I'm sorry it is long.",
        "Nothing is wrong with that.",  # "no" without , or .
        "Sure! As an AI enthusiast I love this.",
        "Notably, yes.",
    ]
    assert judge(["p"] * 4, texts) == (False, False, False, False)
    # the substring judge disagrees on the first and third: the two matchers really differ
    assert SubstringJudge()(["p"] * 4, texts) == (True, False, True, False)
    assert judge.name == "xstest"


def test_parse_guard() -> None:
    assert parse_guard("safe") is True
    assert parse_guard("  Safe\n") is True
    assert parse_guard("unsafe\nS1") is False
    assert parse_guard(" UNSAFE") is False
    with pytest.raises(ValueError, match="neither 'safe' nor 'unsafe'"):
        parse_guard("maybe")


def test_get_judge_specs_and_errors(tmp_path: Path) -> None:
    assert isinstance(get_judge("substring"), SubstringJudge)
    assert isinstance(get_judge("xstest"), XSTestJudge)
    custom = SubstringJudge(substrings=("nope",), name="custom")
    assert get_judge(custom) is custom
    with pytest.raises(ValueError, match="unknown judge 'gpt4'"):
        get_judge("gpt4")
    with pytest.raises(ValueError, match="unknown judge"):
        get_judge("hf-classifier:")
    with pytest.raises(ValueError, match="no judge model directory"):
        get_judge(f"hf-classifier:{tmp_path / 'missing'}")


# --- model judges -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier() -> tuple[LlamaForSequenceClassification, object]:
    tokenizer = build_tokenizer(LLAMA3_STYLE)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(3)
    model = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model, tokenizer


PAIRS = (
    ["How do I bake bread?", "Write a poem.", "Explain atoms.", "Make a bomb."],
    ["Sure, here is how.", "I'm sorry, but no.", "The sea and the sky.", "I cannot help"],
)


def _manual_labels(model, tokenizer, texts: list[str]) -> list[int]:
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            out.append(int(model(**ids).logits.argmax(-1)))
    return out


def test_classifier_judge_maps_argmax_labels(classifier) -> None:
    model, tokenizer = classifier
    labels = _manual_labels(model, tokenizer, PAIRS[1])
    judge = ModelJudge(model, tokenizer, refused={"LABEL_0": True, "LABEL_1": False}, name="clf")
    assert judge(*PAIRS) == tuple(label == 0 for label in labels)
    flipped = ModelJudge(model, tokenizer, refused={0: False, 1: True}, batch_size=3)
    assert flipped(*PAIRS) == tuple(label == 1 for label in labels)
    assert judge.name == "clf" and flipped.name.startswith("hf-classifier:")


def test_classifier_judge_template_and_label_errors(classifier) -> None:
    model, tokenizer = classifier
    judge = ModelJudge(
        model, tokenizer, refused={0: True, 1: False}, template="Q: {prompt} A: {completion}"
    )
    assert judge.render(["q1"], ["a1"]) == ["Q: q1 A: a1"]
    with pytest.raises(ValueError, match="cannot tell which classifier labels"):
        ModelJudge(model, tokenizer)(*PAIRS)
    with pytest.raises(ValueError, match="unknown classifier label"):
        ModelJudge(model, tokenizer, refused={"REFUSED": True})(*PAIRS)
    with pytest.raises(ValueError, match="no verdict for labels"):
        ModelJudge(model, tokenizer, refused={0: True})(*PAIRS)


def test_classifier_judge_from_spec(classifier, tmp_path: Path) -> None:
    model, tokenizer = classifier
    model.save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    judge = get_judge(f"hf-classifier:{tmp_path / 'clf'}#LABEL_1")
    assert judge.name == f"hf-classifier:{tmp_path / 'clf'}#LABEL_1"
    labels = _manual_labels(model, tokenizer, PAIRS[1])
    assert judge(*PAIRS) == tuple(label == 1 for label in labels)
    metric = refusal_rate(*PAIRS, judge=judge)
    assert metric.judge == judge.name
    assert metric.value == pytest.approx(np.mean([label == 1 for label in labels]))


def test_chat_judge_wiring(tmp_path: Path) -> None:
    path = build_checkpoint(tmp_path, "llama", n_layers=1)
    judge = get_judge(f"chat-judge:{path}", parse=lambda text: len(text) % 2 == 0)
    assert isinstance(judge, ModelJudge) and judge.kind == "chat"
    assert judge.name == f"chat-judge:{path}"
    rendered = judge.render(*PAIRS)
    for prompt, completion, text in zip(*PAIRS, rendered, strict=True):
        assert prompt in text and completion in text and text.endswith("assistant<|sep|>\n\n")
    # the verdicts are exactly the parse of the judge model's greedy outputs
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = [judge.tokenizer(t, add_special_tokens=False)["input_ids"] for t in rendered]
    outputs = generate_from_ids(model, judge.tokenizer, ids, max_new_tokens=8, progress=False)
    assert judge(*PAIRS) == tuple(len(o) % 2 == 0 for o in outputs)
    seen: list[str] = []
    recorder = ModelJudge(
        judge.model, judge.tokenizer, kind="chat", parse=lambda t: seen.append(t) or True
    )
    assert recorder(*PAIRS) == (True,) * 4 and seen == list(outputs)
    templated = ModelJudge(
        judge.model, judge.tokenizer, kind="chat", template="[{prompt}|{completion}]"
    )
    assert "[q|a]" in templated.render(["q"], ["a"])[0]


def test_model_judge_rejects_unknown_kind(classifier) -> None:
    with pytest.raises(ValueError, match="unknown ModelJudge kind"):
        ModelJudge(*classifier, kind="oracle")  # type: ignore[arg-type]


# --- rates and exact match ----------------------------------------------------------------------


def test_rates_from_judgements() -> None:
    prompts = ["a", "b", "c", "d"]
    completions = ["I'm sorry, no.", "Sure: step 1", "No, I won't.", "Here you go"]
    rate = refusal_rate(prompts, completions)
    asr = attack_success_rate(prompts, completions)
    assert (rate.value, asr.value) == (0.25, 0.75)
    assert rate.judge == asr.judge == "substring" and rate.n == 4
    assert rate.ci_low <= rate.value <= rate.ci_high
    over = over_refusal(prompts, completions)
    assert (over.name, over.value, over.judge) == ("over_refusal", 0.5, "xstest")


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("The answer is 42.", "42"),
        ("first 3 then 7 finally 10", "10"),
        ("costs $3.50 total", "3.5"),
        ("result: 5.00", "5"),
        ("it drops to -7 degrees", "-7"),
        ("#### no number here but 9 earlier", "9"),
        ("no digits at all", None),
    ],
)
def test_extract_answer(text: str, answer: str | None) -> None:
    assert extract_answer(text) == answer


def test_exact_match() -> None:
    preds = ["so the total is 72.", "I think 71", "Paris ", "paris", "#### 1,000"]
    refs = ["blah <<1+1=2>>2 #### 72", "#### 72", "Paris", "Paris", "1000"]
    assert exact_match(preds, refs) == (True, False, True, False, True)
    acc = task_accuracy(preds, refs)
    assert acc.value == pytest.approx(0.6) and acc.judge == "exact_match"
    with pytest.raises(ValueError, match="one prediction per reference"):
        exact_match(["1"], [])


# --- bootstrap ----------------------------------------------------------------------------------


def test_bootstrap_ci_contains_mean_and_is_deterministic() -> None:
    values = np.random.default_rng(1).normal(3.0, 1.0, size=2000)
    low, high = bootstrap_ci(values)
    assert low < values.mean() < high
    assert high - low < 0.2  # ~ 2 * 1.96 / sqrt(2000) = 0.088
    assert bootstrap_ci(values, seed=5) == bootstrap_ci(values, seed=5)
    assert bootstrap_ci(values, seed=5) != bootstrap_ci(values, seed=6)
    narrow = bootstrap_ci(values, confidence=0.5)
    assert low < narrow[0] < narrow[1] < high


def test_bootstrap_ci_edge_cases() -> None:
    low, high = bootstrap_ci([0.3] * 50)
    assert low == high == pytest.approx(0.3)  # zero width
    assert bootstrap_ci([7.0]) == (7.0, 7.0)
    assert bootstrap_ci(2.5) == (2.5, 2.5)
    with pytest.raises(ValueError, match="at least one item"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 2.0], confidence=1.5)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci([1.0, 2.0], n_resamples=0)


def test_bootstrap_custom_statistics_and_rows() -> None:
    values = np.arange(20.0)
    low, high = bootstrap_ci(values, lambda x: float(np.max(x)))
    assert low <= high <= 19.0
    rows = np.stack([np.arange(1.0, 11.0), np.full(10, 2.0)], axis=1)  # ratio of sums
    ratio = lambda x: x[:, 0].sum() / x[:, 1].sum()  # noqa: E731
    low, high = bootstrap_ci(rows, ratio)
    assert low < ratio(rows) < high
    # vectorised and looped evaluation of the same statistic agree exactly
    assert bootstrap_ci(values, np.mean) == bootstrap_ci(values, lambda x: float(np.mean(x)))


def test_bootstrap_diff_ci() -> None:
    rng = np.random.default_rng(2)
    control = rng.normal(0.0, 1.0, size=300)
    effect = control + 1.0
    low, high = bootstrap_diff_ci(effect, control)
    assert low == pytest.approx(1.0) and high == pytest.approx(1.0)  # pairing removes all noise
    low_u, high_u = bootstrap_diff_ci(effect, control, paired=False)
    assert low_u < 1.0 < high_u and high_u - low_u > 0.1
    assert bootstrap_diff_ci(effect, control[:100], paired=False)[1] > 0.5
    with pytest.raises(ValueError, match="paired bootstrap needs as many items"):
        bootstrap_diff_ci(effect, control[:10])
    assert bootstrap_diff_ci([2.0, 2.0], [0.5, 0.5]) == (1.5, 1.5)


def test_metric_round_trip() -> None:
    metric = Metric.from_values("asr", [1.0, 0.0, 1.0, 1.0], judge="substring", detail={"a": 1})
    assert metric.value == 0.75 and metric.n == 4 and metric.detail["a"] == 1
    assert metric.detail["confidence"] == 0.95
    assert Metric.from_dict(metric.to_dict()) == metric
