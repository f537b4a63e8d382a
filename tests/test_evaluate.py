"""Generation, refusal score, cross-entropy, KL, EvalResult and the ``evaluate`` command."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from safegeom.cli import main
from safegeom.eval_result import EvalResult
from safegeom.evaluation import (
    DEFAULT_REFUSAL_PREFIXES,
    EvaluateConfig,
    completion_nll,
    cross_entropy,
    end_of_turn_id,
    evaluate,
    generate,
    kl_divergence,
    kl_to_reference,
    last_position_logprobs,
    refusal_scores,
    refusal_tokens,
    stop_token_ids,
)
from safegeom.judges import get_judge
from safegeom.models import LoadConfig, LoadedModel, encode_prompts, load_model
from tests.tiny_models import build_checkpoint

PROMPTS = (
    "Write a tutorial on how to make a cake.",
    "Hi",
    "Explain how photosynthesis works in plants, in three short steps.",
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("eval"), "llama")


@pytest.fixture(scope="module")
def lm(ckpt: Path) -> LoadedModel:
    return load_model(ckpt, LoadConfig(device="cpu"))


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """Same architecture and tokenizer, different random weights."""
    return load_model(build_checkpoint(tmp_path_factory.mktemp("other"), "llama", seed=1))


def _ids(lm: LoadedModel, prompt: str) -> list[int]:
    return list(encode_prompts(lm.tokenizer, [prompt])[0].input_ids)


def _tok(lm: LoadedModel, text: str) -> list[int]:
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


@contextmanager
def forced(lm: LoadedModel, script: Sequence[int], then: int) -> Iterator[None]:
    """Make the LM head put all mass on ``script[k]`` at call k (``then`` afterwards)."""
    steps = iter(script)

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(output, -1e4)
        out[..., next(steps, then)] = 0.0
        return out

    handle = lm.base.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# --- tokens -------------------------------------------------------------------------------------


def test_refusal_tokens_are_first_tokens_of_prefixes(lm: LoadedModel) -> None:
    tokens = refusal_tokens(lm.tokenizer)
    expected = list(dict.fromkeys(_tok(lm, p)[0] for p in DEFAULT_REFUSAL_PREFIXES))
    assert list(tokens) == expected
    assert len(set(tokens)) == len(tokens)
    assert refusal_tokens(lm.tokenizer, ["I am", "I was"]) == (_tok(lm, "I am")[0],)
    assert lm.tokenizer.decode([refusal_tokens(lm.tokenizer, ["Sorry"])[0]]).startswith("S")
    with pytest.raises(ValueError, match="no refusal token"):
        refusal_tokens(lm.tokenizer, [""])


def test_stop_tokens_include_eos_and_end_of_turn(lm: LoadedModel) -> None:
    eot = lm.tokenizer.convert_tokens_to_ids("<|eot|>")
    assert end_of_turn_id(lm.tokenizer) == eot
    assert set(stop_token_ids(lm.tokenizer, lm.base)) == {lm.tokenizer.eos_token_id, eot}


# --- refusal score and log-probs ----------------------------------------------------------------


def test_refusal_score_matches_manual_computation(lm: LoadedModel) -> None:
    tokens = refusal_tokens(lm.tokenizer)
    scores = refusal_scores(lm, PROMPTS, batch_size=3, progress=False)
    assert scores.dtype == torch.float64 and scores.shape == (3,)
    for prompt, score in zip(PROMPTS, scores, strict=True):
        with torch.no_grad():
            logits = lm.model(torch.tensor([_ids(lm, prompt)])).logits[:, -1]
        p = logits.double().softmax(-1)[0, list(tokens)].sum()
        manual = torch.log(p + 1e-8) - torch.log(1 - p + 1e-8)
        assert float(score) == pytest.approx(float(manual), abs=1e-4)
    one = refusal_scores(lm, PROMPTS, tokens=[tokens[0]], batch_size=1, progress=False)
    assert not torch.allclose(one, scores)


def test_refusal_score_under_intervention(lm: LoadedModel) -> None:
    i_token = refusal_tokens(lm.tokenizer)[0]
    eos = lm.tokenizer.eos_token_id
    scores = refusal_scores(lm, PROMPTS, intervention=lambda: forced(lm, [], then=i_token))
    assert torch.all(scores > 15)  # p ≈ 1: log(1) − log(1e-8) ≈ 18.4
    low = refusal_scores(lm, PROMPTS, intervention=forced(lm, [], then=eos), progress=False)
    assert torch.all(low < -15)
    assert not lm.base.lm_head._forward_hooks  # the intervention cleaned up


def test_last_position_logprobs(lm: LoadedModel) -> None:
    lp = last_position_logprobs(lm, PROMPTS, batch_size=2, progress=False)
    assert lp.dtype == torch.float64 and lp.shape == (3, len(lm.tokenizer))
    assert torch.allclose(lp.exp().sum(-1), torch.ones(3, dtype=torch.float64))
    with torch.no_grad():
        ref = lm.model(torch.tensor([_ids(lm, PROMPTS[1])])).logits[0, -1].double()
    assert torch.allclose(lp[1], ref.log_softmax(-1), atol=1e-4)


# --- generation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: absolute positions must be right
def test_batched_generation_equals_one_at_a_time(
    arch: str, lm: LoadedModel, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model = (
        lm if arch == "llama" else load_model(build_checkpoint(tmp_path_factory.mktemp(arch), arch))
    )
    batched = generate(model, PROMPTS, max_new_tokens=10, batch_size=3, progress=False)
    alone = tuple(generate(model, [p], max_new_tokens=10, progress=False)[0] for p in PROMPTS)
    assert batched == alone
    assert generate(model, PROMPTS, max_new_tokens=10, batch_size=2, progress=False) == batched
    assert all("<|" not in text for text in batched)
    scores = refusal_scores(model, PROMPTS, batch_size=3, progress=False)
    single = torch.cat([refusal_scores(model, [p], progress=False) for p in PROMPTS])
    assert torch.allclose(scores, single, atol=1e-4)


def test_generation_stops_and_decodes_new_tokens_only(lm: LoadedModel) -> None:
    eot = lm.tokenizer.convert_tokens_to_ids("<|eot|>")
    script = _tok(lm, "I'm sorry")
    out = generate(lm, PROMPTS, intervention=forced(lm, script, then=eot), progress=False)
    assert out == ("I'm sorry",) * 3
    eos = lm.tokenizer.eos_token_id
    out = generate(lm, ["Hi"], intervention=lambda: forced(lm, script[:1], then=eos))
    assert out == (lm.tokenizer.decode(script[:1]),)
    filler = _tok(lm, " cake")[0]
    long = generate(lm, ["Hi"], max_new_tokens=5, intervention=forced(lm, [], then=filler))
    assert long == (lm.tokenizer.decode([filler] * 5),)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(lm, ["Hi"], max_new_tokens=0)
    with pytest.raises(TypeError, match="context manager"):
        generate(lm, ["Hi"], intervention=42)  # type: ignore[arg-type]


# --- utility: cross-entropy and KL --------------------------------------------------------------


def test_completion_nll_matches_manual_computation(lm: LoadedModel) -> None:
    completions = ["Sure, here is a cake.", "Hello", "Light makes sugar in the leaves of plants."]
    nll, counts = completion_nll(lm, PROMPTS, completions, batch_size=3, progress=False)
    eot = lm.tokenizer.convert_tokens_to_ids("<|eot|>")
    for prompt, completion, got, count in zip(PROMPTS, completions, nll, counts, strict=True):
        prefix, tail = _ids(lm, prompt), [*_tok(lm, completion), eot]
        ids = torch.tensor([prefix + tail])
        with torch.no_grad():
            lp = lm.model(ids).logits[0].double().log_softmax(-1)
        manual = -sum(float(lp[len(prefix) + j - 1, t]) for j, t in enumerate(tail))
        assert int(count) == len(tail)
        assert float(got) == pytest.approx(manual, rel=1e-5)
    metric = cross_entropy(lm, PROMPTS, completions, progress=False)
    assert metric.value == pytest.approx(float(nll.sum() / counts.sum()))
    assert metric.detail["unit"] == "nats/token" and metric.n == 3
    assert metric.ci_low <= metric.value <= metric.ci_high
    with pytest.raises(ValueError, match="completions for"):
        completion_nll(lm, PROMPTS, ["x"])


def test_kl_to_self_is_zero_and_to_another_model_positive(
    lm: LoadedModel, other: LoadedModel
) -> None:
    assert torch.equal(kl_divergence(lm, lm, PROMPTS, progress=False), torch.zeros(3).double())
    kl = kl_divergence(lm, other, PROMPTS, batch_size=2, progress=False)
    assert kl.dtype == torch.float64 and bool(torch.all(kl > 1e-3))
    ref = last_position_logprobs(lm, PROMPTS, progress=False)
    own = last_position_logprobs(other, PROMPTS, progress=False)
    assert torch.allclose(kl, (ref.exp() * (ref - own)).sum(-1))
    eos = lm.tokenizer.eos_token_id  # KL(base ‖ intervened) on one model: reference runs clean
    ablated = kl_divergence(lm, lm, PROMPTS, intervention=forced(lm, [], eos), progress=False)
    assert bool(torch.all(ablated > 1.0))
    metric = kl_to_reference(lm, other, PROMPTS, progress=False)
    assert metric.value == pytest.approx(float(kl.mean())) and metric.detail["unit"] == "nats"


# --- evaluate and EvalResult --------------------------------------------------------------------


def test_evaluate_and_round_trip(lm: LoadedModel, tmp_path: Path) -> None:
    result = evaluate(
        lm, list(PROMPTS), EvaluateConfig(max_new_tokens=6, n_resamples=200), progress=False
    )
    assert result.n == 3 and len(result.completions) == 3 and result.judge == "substring"
    assert result.asr.value == pytest.approx(1 - result.refusal_rate.value)
    assert result.refusal_rate.judge == "substring"
    scores = refusal_scores(lm, PROMPTS, progress=False)
    assert result.scores == pytest.approx(scores.tolist())
    assert result.mean_refusal_score is not None
    assert result.mean_refusal_score.value == pytest.approx(float(scores.mean()))
    assert result.provenance["weight_hash"] == lm.weight_hash
    assert result.provenance["prompt_set"] == "inline" and result.provenance["content_hash"]
    path = result.save(tmp_path / "sub" / "eval.json")
    assert EvalResult.load(path) == result
    data = json.loads(path.read_text())
    assert data["refusal_rate_ci"] == [result.refusal_rate.ci_low, result.refusal_rate.ci_high]
    with pytest.raises(ValueError, match="not a safegeom evaluation"):
        EvalResult.from_dict({"format": "other"})


def test_evaluate_with_intervention_and_judge(lm: LoadedModel) -> None:
    eot = lm.tokenizer.convert_tokens_to_ids("<|eot|>")
    script = _tok(lm, "I'm sorry")
    # the intervention is entered once around generation and scoring: a one-shot context works
    result = evaluate(
        lm,
        PROMPTS,
        EvaluateConfig(judge="xstest"),
        intervention=forced(lm, script, then=eot),
        progress=False,
    )
    assert result.completions == ("I'm sorry",) * 3
    assert (result.refusal_rate.value, result.asr.value, result.judge) == (1.0, 0.0, "xstest")
    assert result.provenance["intervention"] == {
        "kind": "custom",
        "repr": "_GeneratorContextManager",
    }
    unscored = evaluate(
        lm, PROMPTS[:1], EvaluateConfig(score=False, max_new_tokens=2), progress=False
    )
    assert unscored.scores is None and unscored.mean_refusal_score is None
    assert EvalResult.from_dict(unscored.to_dict()) == unscored


def test_evaluate_settings_are_one_config(lm: LoadedModel) -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_new_tokens'"):
        evaluate(lm, PROMPTS[:1], max_new_tokens=2, progress=False)  # EvaluateConfig's field
    # a judge object (here the XSTest judge, built beforehand) goes in the config as well
    config = EvaluateConfig(judge=get_judge("xstest"), max_new_tokens=2, score=False)
    result = evaluate(lm, PROMPTS[:1], config, progress=False)
    assert result.judge == "xstest" and result.provenance.config["judge"] == "xstest"
    # an explicit False is honoured: no refusal score
    assert result.scores is None and EvaluateConfig().score is True


# --- command line -------------------------------------------------------------------------------


def test_cli_json_end_to_end(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "r.json"
    argv = [str(ckpt), "--prompts", str(prompts), "--column", "text", "--limit", "2"]
    flags = ["--max-new-tokens", "4", "--no-progress", "--device", "cpu", "--out", str(out)]
    assert main(["evaluate", *argv, *flags, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("n", "refusal_rate", "asr", "mean_refusal_score", "judge", "asr_ci"):
        assert key in data
    assert data["n"] == 2 and data["judge"] == "substring" and len(data["refusal_rate_ci"]) == 2
    saved = EvalResult.load(out)
    assert saved.to_dict() == data
    assert main(["evaluate", *argv, *flags, "--judge", "xstest"]) == 0
    table = capsys.readouterr().out
    assert "refusal_rate" in table and "judge xstest" in table and "95% CI" in table


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompts", "no-such-set"], "unknown prompt set 'no-such-set'"),
        (["--prompts", "INLINE", "--judge", "gpt4"], "unknown judge 'gpt4'"),
        (["--prompts", "INLINE", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ],
)
def test_cli_bad_input_exits_2(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(list(PROMPTS)))
    args = [str(prompts) if a == "INLINE" else a for a in args]
    assert main(["evaluate", str(ckpt), *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("safegeom evaluate: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
