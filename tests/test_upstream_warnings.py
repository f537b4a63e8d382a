"""transformers' FutureWarnings about ``is_gradient_checkpointing`` and ``past_key_values`` (raised
through peft when a LoRA is trained or an adapter loaded) never reach stderr to break a progress
bar; other FutureWarnings still do."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from safegeom.generation import generate
from safegeom.models.loading import load_model
from safegeom.models.upstream_warnings import silence_upstream_deprecations
from safegeom.training.config import TrainConfig
from safegeom.training.runner import train
from tests.tiny_models import build_checkpoint
from tests.train_helpers import FAST, TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def _known(log: list[warnings.WarningMessage]) -> list[str]:
    texts = [str(w.message) for w in log if issubclass(w.category, FutureWarning)]
    return [t for t in texts if "is_gradient_checkpointing" in t or "past_key_values" in t]


def test_lora_training_adapter_loading_and_generation_emit_neither(tmp_path: Path) -> None:
    base = build_checkpoint(tmp_path, "llama")
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")  # what -W error::FutureWarning would turn into errors
        run = train(
            base,
            TINY,
            TrainConfig(steps=1, save_every=1, **FAST),
            method="lora",
            out=tmp_path / "run",
        )
        lm = load_model(run.root / run.checkpoints[-1].path)
        assert lm.adapter is not None
        generate(lm, ["Explain how photosynthesis works."], max_new_tokens=3, progress=False)
    assert _known(log) == []


def test_only_those_two_messages_are_filtered() -> None:
    raised = [
        ("`is_gradient_checkpointing` is deprecated and will be removed", FutureWarning),
        ("`past_key_values` is deprecated for `X.forward`. Use `cache` instead.", FutureWarning),
        ("`is_gradient_checkpointing` is deprecated", DeprecationWarning),
        ("another FutureWarning", FutureWarning),
    ]
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        silence_upstream_deprecations()
        for message, category in raised:
            warnings.warn(message, category, stacklevel=1)
    assert [(str(w.message), w.category) for w in log] == raised[2:]
