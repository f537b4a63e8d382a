"""Chat formatting and exact positions under many templates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from safegeom.models import (
    collate_left,
    encode_prompts,
    load_model,
    parse_layers,
    parse_positions,
    plan_positions,
)
from tests.tiny_models import build_tokenizer

PROMPTS = ["Write a tutorial on how to make a cake.", "How do I kill a Python process?"]


@pytest.mark.parametrize("arch", ["llama", "gemma2", "mistral", "gpt2"])
def test_positions_split_instruction_and_template(checkpoints: dict[str, Path], arch: str) -> None:
    lm = load_model(checkpoints[arch])
    tok = lm.tokenizer
    for prompt, enc in zip(PROMPTS, encode_prompts(tok, PROMPTS), strict=True):
        ids = list(enc.input_ids)
        # The instruction tokens decode back to the instruction; the rest is template.
        instruction = tok.decode(ids[enc.inst_start : enc.t_inst + 1])
        assert instruction.strip() == prompt.strip()
        post = tok.decode(ids[enc.t_inst + 1 :])
        assert prompt not in post and len(post) > 0
        # Tokenization matches transformers' own apply_chat_template(tokenize=True).
        reference = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        reference = reference if isinstance(reference, list) else reference["input_ids"]
        assert ids == list(reference)


def test_no_double_bos(checkpoints: dict[str, Path]) -> None:
    tok = load_model(checkpoints["llama"]).tokenizer
    enc = encode_prompts(tok, PROMPTS[:1])[0]
    assert enc.input_ids.count(tok.bos_token_id) == 1 and enc.input_ids[0] == tok.bos_token_id


def test_text_after_instruction_is_t_post(checkpoints: dict[str, Path]) -> None:
    tok = load_model(checkpoints["mistral"]).tokenizer
    enc = encode_prompts(tok, PROMPTS[:1])[0]
    post = tok.decode(list(enc.input_ids[enc.t_inst + 1 :]))
    assert post == "\nPlease answer helpfully.\nAssistant:"


def test_system_prompt(checkpoints: dict[str, Path]) -> None:
    tok = load_model(checkpoints["mistral"]).tokenizer
    # The system text repeats the instruction: t_inst must still be in the user turn.
    enc = encode_prompts(tok, PROMPTS[:1], system=PROMPTS[0])[0]
    assert tok.decode(list(enc.input_ids[: enc.inst_start])).startswith("System: " + PROMPTS[0])


def test_left_padding_positions(checkpoints: dict[str, Path]) -> None:
    tok = load_model(checkpoints["llama"]).tokenizer
    encoded = encode_prompts(tok, ["Hi.", PROMPTS[0]])
    batch = collate_left(encoded, tok.pad_token_id)
    plan = plan_positions("t_inst,t_post,last,-2,0", encoded)
    index = plan.index(batch)
    for row, enc in enumerate(encoded):
        pad = batch.seq_len - len(enc)
        ids = batch.input_ids[row]
        assert ids[index[row, 0]] == enc.input_ids[enc.t_inst]
        assert index[row, 1 + plan.n_post] == batch.seq_len - 1  # last
        assert ids[index[row, -1]] == enc.input_ids[0] and index[row, -1] == pad
        assert batch.position_ids[row, pad] == 0 and batch.attention_mask[row, :pad].sum() == 0
    assert plan.labels[0] == "t_inst" and plan.labels[-2:] == ("offset[-2]", "offset[0]")


def test_no_template_is_an_error() -> None:
    tok = build_tokenizer("x")
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template; pass chat_template="):
        encode_prompts(tok, PROMPTS)
    enc = encode_prompts(tok, PROMPTS, chat_template="Q: {{ messages[-1]['content'] }}\nA:")
    assert enc[0].n_post == len(tok("\nA:", add_special_tokens=False)["input_ids"])


def test_bad_prompts(checkpoints: dict[str, Path]) -> None:
    tok = load_model(checkpoints["llama"]).tokenizer
    with pytest.raises(ValueError, match="empty prompt set"):
        encode_prompts(tok, [])
    with pytest.raises(ValueError, match="empty prompt: every instruction needs text"):
        encode_prompts(tok, ["  "])
    with pytest.raises(ValueError, match="does not insert the instruction verbatim"):
        encode_prompts(tok, PROMPTS, chat_template="{{ messages[-1]['content'] | upper }}")


def test_position_and_layer_specs() -> None:
    assert parse_positions("t_inst, t_post,-1") == ("t_inst", "t_post", -1)
    assert parse_layers("all", 4) == (0, 1, 2, 3)
    assert parse_layers("-1", 4) == (3,)
    assert parse_layers("1:3", 4) == (1, 2)
    assert parse_layers("1-3", 4) == (1, 2, 3)
    assert parse_layers([0, -1], 4) == (0, 3)
    with pytest.raises(ValueError, match="unknown position 'middle'"):
        parse_positions("middle")
    with pytest.raises(ValueError, match="empty position spec"):
        parse_positions("")
    with pytest.raises(ValueError, match=r"layer 4 out of range: the model has 4 layers"):
        parse_layers("4", 4)
    with pytest.raises(ValueError, match="bad layer spec"):
        parse_layers("a-b", 4)


def test_offset_outside_prompt(checkpoints: dict[str, Path]) -> None:
    tok = load_model(checkpoints["llama"]).tokenizer
    encoded = encode_prompts(tok, PROMPTS)
    plan = plan_positions([-500], encoded)
    with pytest.raises(ValueError, match="position offset -500 lies outside a prompt"):
        plan.index(collate_left(encoded, tok.pad_token_id))
    assert torch.is_tensor(plan_positions("last", encoded).index(collate_left(encoded, 0)))
