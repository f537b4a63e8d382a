"""Tokenizers load exactly as tokenizer.json defines them, checked by a probe on every load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from safegeom.errors import ModelLoadError
from safegeom.models import TINY_CHAT, load_model, tiny_chat_path
from safegeom.models.tokenizer_loading import check_tokenizer
from tests.tiny_models import build_tokenizer

TEXT = "<|user|> list three prime numbers <|end|> <|assistant|>"
WORDS = ["<|pad|>", "<|user|>", "<|end|>", "<|assistant|>", "list", "three", "prime", "numbers"]


def _wordlevel() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate([*WORDS, "a", "[UNK]"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.add_special_tokens(["<|pad|>", "<|user|>", "<|end|>", "<|assistant|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<|pad|>", eos_token="<|end|>")
    tok.chat_template = "{% for m in messages %}<|user|> {{ m['content'] }} <|end|> {% endfor %}"
    return tok


def _save(root: Path, model_type: str, tokenizer: PreTrainedTokenizerFast) -> Path:
    out = root / model_type
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("kind", ["wordlevel", "bpe"])
def test_tokenizer_loads_as_tokenizer_json(tmp_path: Path, model_type: str, kind: str) -> None:
    tokenizer = _wordlevel() if kind == "wordlevel" else build_tokenizer("{{ messages }}")
    folder = _save(tmp_path, model_type, tokenizer)
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == (
        "TokenizersBackend"
    )
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = TEXT if kind == "wordlevel" else "Write a tutorial on how to make a cake."
    lm = load_model(folder)
    assert (
        lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        == raw.encode(text, add_special_tokens=False).ids
    )
    assert lm.tokenizer.eos_token == tokenizer.eos_token
    assert lm.tokenizer.chat_template == tokenizer.chat_template


def test_wordlevel_beside_qwen2_was_retokenized_by_autotokenizer(tmp_path: Path) -> None:
    # The bug this guards against: AutoTokenizer builds Qwen2Tokenizer and re-tokenizes.
    folder = _save(tmp_path, "qwen2", _wordlevel())
    auto = AutoTokenizer.from_pretrained(folder)
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    if auto.tokenize(TEXT) == raw.encode(TEXT).tokens:
        pytest.skip("this transformers version loads the tokenizer faithfully")
    with pytest.raises(
        ModelLoadError,
        match=r"encodes differently from .*tokenizer\.json.*"
        r'"tokenizer_class": "TokenizersBackend"',
    ):
        check_tokenizer(auto, folder / "tokenizer.json", "Qwen2Tokenizer")
    assert load_model(folder).tokenizer.tokenize(TEXT) == raw.encode(TEXT).tokens


def test_tiny_chat_tokenizer_unchanged() -> None:
    lm = load_model(TINY_CHAT)
    auto = AutoTokenizer.from_pretrained(tiny_chat_path())
    text = "<|user|> Write a tutorial on how to make a cake. <|end|>"
    assert type(lm.tokenizer) is type(auto)
    assert lm.tokenizer(text)["input_ids"] == auto(text)["input_ids"]
    assert lm.tokenizer.chat_template == auto.chat_template
    assert lm.tokenizer.padding_side == "left"
    assert lm.tokenizer.pad_token_id == auto.pad_token_id
