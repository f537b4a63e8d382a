"""``kl --kl-examples harmless``: the KL to the reference on the examples a task marks harmless only."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from safegeom.errors import ConfigError, SafegeomError
from safegeom.models import load_model
from safegeom.training.config import TrainConfig
from safegeom.training.data import collate_right, encode_examples
from safegeom.training.methods.kl import KLState, harmless_rows
from safegeom.training.regularised import RegConfig, per_example_terms, regularised_loss
from safegeom.training.runner import train
from safegeom.training.step import StepLoss
from safegeom.training.tasks import get_task
from safegeom.training.trainable import wrap_model
from tests.tiny_models import build_checkpoint
from tests.train_helpers import FAST, TINY

pytestmark = pytest.mark.usefixtures("one_thread")

MARKED = replace(TINY, kinds=("harmless", "harmful"))
"""TINY with its first example marked harmless and its second harmful."""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random 3-block Llama checkpoint."""
    return build_checkpoint(tmp_path_factory.mktemp("klx"), "llama")


def test_a_jsonl_kind_is_read_per_example_and_left_out_of_the_hash(tmp_path: Path) -> None:
    rows = [
        {"prompt": "a?", "response": "A.", "kind": "harmless"},
        {"prompt": "b?", "response": "B."},
        {"prompt": "c?", "response": "C.", "kind": "harmful"},
    ]
    marked = tmp_path / "marked.jsonl"
    marked.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = tmp_path / "plain.jsonl"
    plain.write_text(
        "".join(json.dumps({k: r[k] for k in ("prompt", "response")}) + "\n" for r in rows)
    )
    task = get_task(marked)
    assert task.kinds == ("harmless", None, "harmful")
    assert get_task(plain).kinds is None
    assert task.content_hash == get_task(plain).content_hash
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a?", "response": "A.", "kind": 1}) + "\n")
    with pytest.raises(SafegeomError, match=r"bad.jsonl:1: field 'kind' must be a string"):
        get_task(bad)
    with pytest.raises(SafegeomError, match="1 kinds for 2 examples"):
        replace(TINY, kinds=("harmful",))


def test_harmless_rows_refuses_a_task_that_does_not_mark_its_examples() -> None:
    assert harmless_rows(("harmless", "harmful", "harmless")).tolist() == [True, False, True]
    for kinds in (None, (None, None)):
        with pytest.raises(
            ConfigError, match=r"kl_examples \(--kl-examples\) harmless needs a task"
        ):
            harmless_rows(kinds)
    with pytest.raises(ConfigError, match=r"--kl-examples\) harmless: task row 1 has kind None"):
        harmless_rows(("harmless", None))
    with pytest.raises(ConfigError, match=r"kl_examples \(--kl-examples\) must be all or harmless"):
        RegConfig(kl_examples="benign")  # type: ignore[arg-type]


def test_the_kl_of_unmarked_rows_is_zero_weighted_over_the_whole_batch() -> None:
    g = torch.Generator().manual_seed(0)
    ce = torch.rand(4, generator=g, dtype=torch.float64)
    kl = torch.rand(4, generator=g, dtype=torch.float64)
    answered = torch.tensor([True, True, True, False])
    everything, _ = regularised_loss(ce, kl, answered, risk=None, kl_weight=2.0)
    ones = torch.ones(4, dtype=torch.bool)
    same, _ = regularised_loss(ce, kl, answered, risk=None, kl_weight=2.0, kl_rows=ones)
    assert torch.equal(everything, same)
    rows = torch.tensor([True, False, True, True])
    loss, terms = regularised_loss(ce, kl, answered, risk=None, kl_weight=2.0, kl_rows=rows)
    by_hand = (kl[0] + kl[2]) / 3  # harmless and answered, over the batch's 3 answered rows
    torch.testing.assert_close(terms["kl"], by_hand)
    torch.testing.assert_close(loss, ce[:3].mean() + 2.0 * by_hand)
    none = torch.zeros(4, dtype=torch.bool)
    loss, terms = regularised_loss(ce, kl, answered, risk=None, kl_weight=2.0, kl_rows=none)
    assert float(terms["kl"]) == 0.0 and torch.equal(loss, ce[:3].sum() / 3)


def test_a_step_takes_the_kl_of_the_harmless_examples_only(ckpt: Path) -> None:
    lm = load_model(ckpt)
    settings = {"lora_r": 4, "lora_targets": ("q_proj", "v_proj")}
    trainable = wrap_model(lm, ckpt, "lora", settings, dtype="float32", resume_from=None)
    torch.manual_seed(1)
    with torch.no_grad():  # move the adapters off zero so that the policy leaves the reference
        for name, param in trainable.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    examples = encode_examples(lm.tokenizer, TINY.prompts, TINY.responses)
    pad = int(lm.tokenizer.pad_token_id)
    batch = collate_right(examples, pad)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    model = trainable.model
    with torch.no_grad():
        policy = model(**inputs, use_cache=False).logits
        with trainable.module.disable_adapter():  # type: ignore[operator]
            frozen = model(**inputs, use_cache=False).logits
    ce, kl = per_example_terms(policy, frozen, batch.labels)
    assert kl is not None and float(kl.min()) > 1e-3
    rows = harmless_rows(MARKED.kinds)
    chosen = StepLoss(trainable, examples, pad, KLState(1.0, kl_rows=rows))
    loss, terms = chosen([0, 1], 1)
    torch.testing.assert_close(terms["kl"], kl[0] / 2)  # the harmless example's KL, over both
    torch.testing.assert_close(loss, ce.mean() + kl[0] / 2)
    harmful_only, terms = chosen([1], 1)
    assert float(terms["kl"]) == 0.0 and torch.equal(harmful_only, terms["task"])
    _, every = StepLoss(trainable, examples, pad, KLState(1.0))([0, 1], 1)
    torch.testing.assert_close(every["kl"], kl.mean())  # the default: every example's KL


def test_train_records_the_setting_and_harmful_batches_are_plain_sft(
    ckpt: Path, tmp_path: Path
) -> None:
    config = TrainConfig(steps=2, lr=1e-2, **FAST)
    settings = RegConfig(kl_weight=1.0, kl_examples="harmless")
    with pytest.raises(ConfigError, match=r"--kl-examples\) harmless needs a task"):
        train(ckpt, TINY, config, method="kl", settings=settings, out=tmp_path / "unmarked")
    harmful = replace(TINY, kinds=("harmful", "harmful"))
    traj = train(ckpt, harmful, config, method="kl", settings=settings, out=tmp_path / "harmful")
    assert traj.config["defence"] == {
        "method": "kl",
        "kl_weight": 1.0,
        "kl_examples": "harmless",
        "harmless_examples": 0,
        "harmful_examples": 2,
    }
    assert all(r["kl"] == 0.0 and r["loss"] == r["task"] for r in traj.log)
    mixed = train(ckpt, MARKED, config, method="kl", settings=settings, out=tmp_path / "mixed")
    assert mixed.config["defence"]["harmless_examples"] == 1
    assert mixed.log[-1]["kl"] > 0  # the harmless example still carries the KL


def test_the_flag_parses_and_is_for_kl_only(ckpt: Path, tmp_path: Path) -> None:
    from safegeom.cli import build_parser
    from safegeom.cli.train import check_method_flags

    common = [str(ckpt), "--task", "t.jsonl", "--out", str(tmp_path / "o")]
    args = build_parser().parse_args(["train", "kl", *common, "--kl-examples", "harmless"])
    assert vars(args)["RegConfig.kl_examples"] == "harmless"
    check_method_flags("kl", args)
    plain = build_parser().parse_args(["train", "kl", *common])
    assert vars(plain)["RegConfig.kl_examples"] == "all"
    adaptive = build_parser().parse_args(
        ["train", "adaptive", *common, "--kl-examples", "harmless"]
    )
    with pytest.raises(ConfigError, match="--kl-examples is for kl; got method adaptive"):
        check_method_flags("adaptive", adaptive)
