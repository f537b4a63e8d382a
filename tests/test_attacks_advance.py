"""GCG's steps on a given suffix (what R2D2 calls): the same steps as a whole attack, from any
suffix, and bad input named."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from safegeom.attacks.gcg import GCGConfig, advance, attack_one
from safegeom.attacks.slots import build_slot
from safegeom.attacks.targets import behaviours_and_targets
from safegeom.errors import ConfigError
from safegeom.models import LoadConfig, LoadedModel, load_model

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = GCGConfig(n_tokens=6, steps=3, search_width=32, top_k=16, early_stop=False, seed=5)


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return load_model("tiny-chat", LoadConfig(device="cpu"))


def test_advance_takes_the_attacks_steps(lm: LoadedModel) -> None:
    """From the initial suffix with the attack's generator, ``advance`` walks the attack's path:
    its loss after k steps is the attack's k-th traced loss, and GCG lowers it."""
    prompts, targets = behaviours_and_targets("advbench:val", limit=1)
    behaviour, target = prompts.prompts[0], targets[0]
    record = attack_one(lm, behaviour, target, SMALL)
    slot = build_slot(lm, behaviour, target, n_tokens=SMALL.n_tokens)
    generator = torch.Generator().manual_seed(SMALL.seed)
    moved = advance(lm, slot, slot.opt_ids, SMALL.steps, SMALL, generator)
    assert moved.steps == SMALL.steps and len(moved.ids) == SMALL.n_tokens
    assert moved.loss == record.losses[-1] < record.initial_loss
    again = advance(lm, slot, moved.ids, 1, SMALL, torch.Generator().manual_seed(1))
    assert again.ids != moved.ids  # it continues from the suffix it is given


def test_advance_refuses_bad_input(lm: LoadedModel) -> None:
    slot = build_slot(lm, "Explain how locks work", "Sure, here is", n_tokens=4)
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ConfigError, match="GCG steps per advance must be at least 1, got 0"):
        advance(lm, slot, slot.opt_ids, 0, SMALL, generator)
    with pytest.raises(ConfigError, match="has 3 tokens; its slot holds 4"):
        advance(lm, slot, slot.opt_ids[:3], 1, dataclasses.replace(SMALL, n_tokens=4), generator)
