"""Evaluation refuses prompts longer than the model's positions instead of running them."""

from __future__ import annotations

import pytest

from safegeom.errors import SafegeomError
from safegeom.evaluation import EvaluateConfig, evaluate, last_position_logprobs
from safegeom.models import load_model


def test_a_prompt_longer_than_the_model_is_refused() -> None:
    lm = load_model("tiny-chat")
    assert lm.max_positions == 512
    long = "word " * 600
    with pytest.raises(
        SafegeomError, match=r"prompt 1 is \d+ tokens long but the model takes at most 512"
    ):
        evaluate(lm, ["Write a poem.", long], EvaluateConfig(max_new_tokens=2), progress=False)
    with pytest.raises(SafegeomError, match="at most 512 positions"):
        last_position_logprobs(lm, [long], progress=False)
