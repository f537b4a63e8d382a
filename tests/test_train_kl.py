"""The KL-regularised trainers' loss: its terms, the constant weight, and the reference policy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from safegeom.models import load_model
from safegeom.training.config import TrainConfig
from safegeom.training.data import collate_right, encode_examples
from safegeom.training.methods.kl import KLState
from safegeom.training.regularised import RegConfig, per_example_terms
from safegeom.training.runner import train
from safegeom.training.step import StepLoss
from safegeom.training.trainable import wrap_model
from tests.tiny_models import build_checkpoint
from tests.train_helpers import FAST, TINY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random 3-block Llama and GPT-2 checkpoints (GPT-2's config has dropout 0.1)."""
    root = tmp_path_factory.mktemp("kl")
    return {arch: build_checkpoint(root, arch) for arch in ("llama", "gpt2")}


def _check_log(traj, keys: set[str]) -> None:
    assert [int(r["step"]) for r in traj.log] == list(range(1, traj.last.step + 1))
    assert all(set(r) == {"step", "loss", *keys} for r in traj.log)
    assert set(traj.checkpoints[-1].terms) == keys


def test_kl_weight_zero_is_the_task_loss(ckpts, tmp_path: Path) -> None:
    zero = train(
        ckpts["llama"],
        TINY,
        TrainConfig(steps=3, lr=1e-2, **FAST),
        method="kl",
        settings=RegConfig(kl_weight=0.0),
        out=tmp_path / "zero",
    )
    _check_log(zero, {"task", "kl"})
    assert zero.config["defence"] == {"method": "kl", "kl_weight": 0.0}
    assert all(r["loss"] == r["task"] for r in zero.log)
    assert zero.checkpoints[0].terms["kl"] == 0.0  # LoRA at zero is the reference
    assert zero.log[-1]["kl"] > 0
    two = train(
        ckpts["llama"],
        TINY,
        TrainConfig(steps=3, lr=1e-2, **FAST),
        method="kl",
        settings=RegConfig(kl_weight=2.0),
        out=tmp_path / "two",
    )
    for row in two.log:
        assert row["loss"] == pytest.approx(row["task"] + 2.0 * row["kl"], rel=1e-6)


def test_per_example_terms_against_a_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 2, 4, -100], [-100, 1, 1, 1, 6], [-100] * 5])
    ce, kl = per_example_terms(logits, logits.clone(), labels)
    assert kl is not None and torch.equal(kl, torch.zeros(3))
    logp = torch.log_softmax(logits.float(), -1)
    expected = [-(logp[0, 1, 2] + logp[0, 2, 4]) / 2, -logp[1, :4, [1, 1, 1, 6]].diagonal().mean()]
    torch.testing.assert_close(ce, torch.stack([*expected, torch.tensor(0.0)]))
    ref = torch.randn(3, 5, 7, generator=g)
    _, kl = per_example_terms(logits, ref, labels)
    p = torch.softmax(ref, -1)
    direct = (p * (torch.log_softmax(ref, -1) - logp)).sum(-1)  # [batch, seq]
    assert kl is not None and float(kl[2]) == 0.0
    torch.testing.assert_close(kl[:2], torch.stack([direct[0, 1:3].mean(), direct[1, :4].mean()]))
    assert per_example_terms(logits, None, labels)[1] is None


def test_the_reference_is_the_frozen_model_without_dropout(ckpts) -> None:
    lm = load_model(ckpts["gpt2"])
    assert lm.model.config.resid_pdrop > 0
    settings = {"lora_r": 4, "lora_targets": ("c_attn",), "lora_dropout": 0.3}
    trainable = wrap_model(lm, ckpts["gpt2"], "lora", settings, dtype="float32", resume_from=None)
    examples = encode_examples(lm.tokenizer, TINY.prompts, TINY.responses)
    step = StepLoss(trainable, examples, int(lm.tokenizer.pad_token_id), KLState(kl_weight=1.0))
    batch = collate_right(examples, int(lm.tokenizer.pad_token_id))
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    model = trainable.model
    model.eval()
    with torch.no_grad():
        frozen = model(**inputs, use_cache=False).logits  # LoRA at zero, no dropout
    model.train()
    torch.manual_seed(5)
    with torch.no_grad():
        policy = model(**inputs, use_cache=False).logits  # the step's own dropout masks
    torch.manual_seed(5)
    _, terms = step([0, 1], 1)
    _, kl = per_example_terms(policy, frozen, batch.labels)
    assert kl is not None and float(kl.mean()) > 1e-3  # dropout moves the policy, not the reference
    assert float(terms["kl"]) == pytest.approx(float(kl.mean()), rel=1e-5)
    assert all(m.training for m in model.modules())  # the train mode is back after the step
