"""Audit inputs that would be measured silently wrong are refused in one line: another vocabulary
or tokenizer than the base's, an embedding smaller than its tokenizer, broken checkpoint-N
symlinks, a path that does not exist; and weights that are not finite are named at load."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from safegeom.audit.inputs import resolve_inputs
from safegeom.errors import ConfigError, ModelLoadError, NonFiniteError, NotFoundError
from safegeom.models import LoadConfig, load_model
from safegeom.models.vocab import read_vocabulary
from tests.tiny_models import build_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("vocab"), "llama", n_layers=1)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_same_tokenizer_resaved_matches(llama: Path, tmp_path: Path) -> None:
    copy = _copy(llama, tmp_path / "step-1")
    data = json.loads((copy / "tokenizer.json").read_text())
    data["truncation"] = {"max_length": 9, "strategy": "LongestFirst", "stride": 0}
    (copy / "tokenizer.json").write_text(json.dumps(data, indent=1))
    assert read_vocabulary(copy) == read_vocabulary(llama)
    assert [t.path for t in resolve_inputs([llama, copy]).checkpoints] == [str(copy)]


def test_another_tokenizer_is_refused(llama: Path, tmp_path: Path) -> None:
    other = _copy(llama, tmp_path / "step-1")
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # same size, other ids
    (other / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"has another tokenizer than the base"):
        resolve_inputs([llama, other])


def test_another_vocabulary_size_is_refused(llama: Path, tmp_path: Path) -> None:
    other = _copy(llama, tmp_path / "step-1")
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] += 64
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"has a vocabulary of \d+ tokens but the base"):
        resolve_inputs([llama, other])


def test_embedding_smaller_than_tokenizer_is_one_line(llama: Path, tmp_path: Path) -> None:
    small = _copy(llama, tmp_path / "step-1")
    tokenizer = AutoTokenizer.from_pretrained(small)
    tokenizer.add_tokens(["<|extra1|>", "<|extra2|>"])
    tokenizer.save_pretrained(small)
    with pytest.raises(ModelLoadError, match=r"its embedding has \d+ rows .* but its tokenizer"):
        resolve_inputs([llama, small])
    with pytest.raises(ModelLoadError, match=r"input embedding has \d+ rows but its tokenizer"):
        load_model(small, LoadConfig(device="cpu"))


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_broken_checkpoint_symlink_is_named(llama: Path, tmp_path: Path, kind: str) -> None:
    root = tmp_path / "trainer"
    root.mkdir()
    _copy(llama, root / "checkpoint-1")
    link = root / "checkpoint-2"
    os.symlink(tmp_path / "gone" if kind == "dangling" else link, link)
    problem = "dangling symlink" if kind == "dangling" else "symlink loop"
    with pytest.raises(NotFoundError, match=rf"checkpoint-2 is a {problem}"):
        resolve_inputs([root], base=str(llama))


def test_missing_path_says_no_such_path(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"nope: no such path; give a run folder"):
        resolve_inputs([tmp_path / "nope"])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_is_named_at_load(llama: Path, tmp_path: Path, value: float) -> None:
    broken = _copy(llama, tmp_path / "broken")
    weights = load_file(broken / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    weights[name][0, 0] = value
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=rf"weight {name} holds 1 NaN/inf") as err:
        load_model(broken, LoadConfig(device="cpu", dtype="float32"))
    assert "dtype" not in str(err.value)
    assert load_model(llama, LoadConfig(device="cpu")).model.training is False


def test_finite_float32_overflow_advice_does_not_say_float32(llama: Path) -> None:
    from safegeom.activations.engine import overflow_advice

    lm = load_model(llama, LoadConfig(device="cpu", dtype="float32"))
    assert "--dtype float32" not in overflow_advice(lm)
    lm.model.to(torch.bfloat16)
    assert "try --dtype float32" in overflow_advice(lm)
