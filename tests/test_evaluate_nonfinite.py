"""Non-finite values and empty completions are never scored silently as attack success."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

from safegeom.carriers.carrier import Carrier
from safegeom.errors import NonFiniteError
from safegeom.evaluation import EvaluateConfig, evaluate, last_position_logprobs, refusal_scores
from safegeom.interventions import Addition
from safegeom.models import LoadConfig, LoadedModel, load_model
from safegeom.sweeps import SweepConfig, causal_sweep
from tests.test_evaluate import PROMPTS, forced

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(checkpoints: dict[str, Path]) -> LoadedModel:
    return load_model(checkpoints["llama"], LoadConfig(device="cpu"))


@pytest.fixture(scope="module")
def nan_lm(lm: LoadedModel) -> LoadedModel:
    model = copy.deepcopy(lm.model)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return LoadedModel(
        model=model, tokenizer=lm.tokenizer, name="nan", source=lm.source, layout=lm.layout
    )


def test_nan_model_raises_naming_the_logits(nan_lm: LoadedModel) -> None:
    with pytest.raises(NonFiniteError, match="generation logits contain NaN"):
        evaluate(nan_lm, PROMPTS, EvaluateConfig(max_new_tokens=3), progress=False)
    with pytest.raises(NonFiniteError, match="refusal score logits contain NaN"):
        refusal_scores(nan_lm, PROMPTS, progress=False)
    with pytest.raises(NonFiniteError, match="logprobs logits contain NaN"):
        last_position_logprobs(nan_lm, PROMPTS, progress=False)


def test_overflowing_coefficient_raises(lm: LoadedModel) -> None:
    carrier = Carrier(
        vectors=torch.full((lm.d_model,), 10.0),
        kind="refusal",
        method="dim",
        layer=0,
        position="t_post[-1]",
    )
    with pytest.raises(NonFiniteError, match=r"contain (NaN|inf)"):
        evaluate(
            lm,
            PROMPTS,
            EvaluateConfig(max_new_tokens=2),
            intervention=Addition(carrier, coeff=1e38),
            progress=False,
        )
    with pytest.raises(NonFiniteError, match="must be a finite number, got nan"):
        Addition(carrier, coeff=float("nan"))


def test_nan_model_in_a_sweep_raises(nan_lm: LoadedModel) -> None:
    carrier = Carrier(
        vectors=torch.randn(nan_lm.d_model),
        kind="refusal",
        method="dim",
        layer=0,
        position="t_post[-1]",
    )
    config = SweepConfig(ops=("ablate",), n_random=2, n_prompts=2, n_resamples=10)
    with pytest.raises(NonFiniteError, match="NaN"):
        causal_sweep(nan_lm, carrier, list(PROMPTS), list(PROMPTS), config, progress=False)
    with pytest.raises(NonFiniteError, match=r"add_strengths \(--strengths\) must be finite"):
        SweepConfig(add_strengths=(1.0, float("inf")))


def test_empty_completions_are_counted_and_warned(lm: LoadedModel) -> None:
    eot = lm.tokenizer.convert_tokens_to_ids("<|eot|>")
    with pytest.warns(UserWarning, match="3 of 3 completions are empty"):
        result = evaluate(lm, PROMPTS, intervention=forced(lm, [], then=eot), progress=False)
    assert result.completions == ("",) * 3 and result.n_empty == 3
    assert result.asr.value == 1.0 and result.provenance["n_empty"] == 3
    assert result.to_dict()["n_empty"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        normal = evaluate(
            lm, PROMPTS[:1], EvaluateConfig(max_new_tokens=3, score=False), progress=False
        )
    assert normal.n_empty == 0
