"""Tests of the tiny-chat build: determinism, tokenizer/template contract, shipped assets."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

from tools.tinychat.build import TinyChatConfig, build_tiny_chat, main
from tools.tinychat.corpus import (
    COMPLIANT_FORBIDDEN_FIRST_WORDS,
    compliant_response,
    is_refusal,
    refusal_response,
)
from tools.tinychat.loop import CONTENT_FIRST_EPOCH, lr_at
from tools.tinychat.templates import SURE_OPENERS

ASSETS = Path(__file__).resolve().parents[1] / "safegeom" / "assets" / "tiny-chat"
TINY = TinyChatConfig(
    vocab_size=600,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    max_len=64,
    steps=3,
    batch_size=4,
    warmup_steps=1,
    content_steps=2,
    content_warmup_steps=1,
    bucket_batches=2,
    save_dtype="float32",
)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    """Load the saved weights of a build."""
    return load_file(str(out / "model.safetensors"))


@pytest.fixture(scope="module")
def seed0_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two 3-step builds of a tiny config with seed 0."""
    a = build_tiny_chat(tmp_path_factory.mktemp("a"), seed=0, progress=False, config=TINY)
    b = build_tiny_chat(tmp_path_factory.mktemp("b"), seed=0, progress=False, config=TINY)
    return a, b


def test_same_seed_gives_bit_identical_weights(seed0_runs: tuple[Path, Path]) -> None:
    """Two runs with the same seed save identical weights and tokenizers."""
    a, b = seed0_runs
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_different_seed_gives_different_weights(
    seed0_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    """A different seed changes the weights."""
    c = build_tiny_chat(tmp_path / "c", seed=1, progress=False, config=TINY)
    wa, wc = _weights(seed0_runs[0]), _weights(c)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa if wa[k].shape == wc[k].shape)


def test_the_content_phase_changes_the_weights(
    seed0_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    """Dropping the content phase gives other weights from the same base phase."""
    config = TinyChatConfig(**{**asdict(TINY), "content_steps": 0})
    base_only = build_tiny_chat(tmp_path / "base", seed=0, progress=False, config=config)
    wa, wb = _weights(seed0_runs[0]), _weights(base_only)
    assert wa.keys() == wb.keys()
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)


def test_phases_follow_the_config() -> None:
    """The content phase exists only with ``content_steps > 0`` and reads its own corpus stream."""
    base, content = TinyChatConfig().phases()
    assert (base.name, base.steps, base.lr, base.p_recombine, base.first_epoch) == (
        "base",
        700,
        1.5e-3,
        0.0,
        0,
    )
    assert (content.name, content.steps, content.lr, content.p_recombine) == (
        "content",
        250,
        5e-4,
        1.0,
    )
    assert content.first_epoch == CONTENT_FIRST_EPOCH > 0
    assert [p.name for p in TinyChatConfig(content_steps=0).phases()] == ["base"]


def test_negative_content_steps_are_refused(tmp_path: Path) -> None:
    """From the config, the keyword and the command line alike."""
    config = TinyChatConfig(**{**asdict(TINY), "content_steps": -1})
    with pytest.raises(ValueError, match="content_steps must be >= 0, got -1"):
        build_tiny_chat(tmp_path, progress=False, config=config)
    with pytest.raises(ValueError, match="content_steps must be >= 0, got -2"):
        build_tiny_chat(tmp_path, progress=False, config=TINY, content_steps=-2)
    with pytest.raises(ValueError, match="content_steps must be >= 0, got -3"):
        main(["--out", str(tmp_path), "--content-steps", "-3", "--no-progress"])


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    """Each phase's schedule: linear warm-up to the peak, then cosine down to ``peak * min_ratio``."""
    lrs = [lr_at(s, 1e-3, 10, 100, 0.05) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[100] == pytest.approx(5e-5)


def test_refusals_and_compliance_are_separable_by_response_only() -> None:
    """Refusals always contain a refusal substring; compliant answers never do and never start with
    a refusal first word."""
    rng = random.Random(0)
    prompts = ["Write a poem about the sea.", "How do I bake bread?", "I like cats. Tell me why."]
    for _ in range(300):
        p = rng.choice(prompts)
        assert is_refusal(refusal_response(p, rng))
        answer = compliant_response(p, rng)
        assert not is_refusal(answer), answer
        assert answer.split()[0].strip(",.!:").lower() not in COMPLIANT_FORBIDDEN_FIRST_WORDS


def test_sure_openers_follow_p_sure() -> None:
    """``p_sure`` sets the share of compliant answers that open with a "Sure ..." prefix; the
    answers stay compliant either way."""
    prompt = "Write a poem about the sea."
    for p_sure, low, high in ((0.0, 0.0, 0.15), (0.35, 0.3, 0.5), (1.0, 1.0, 1.0)):
        rng = random.Random(1)
        answers = [compliant_response(prompt, rng, p_sure) for _ in range(400)]
        share = sum(a.startswith(SURE_OPENERS) for a in answers) / len(answers)
        assert low <= share <= high, (p_sure, share)
        assert not any(is_refusal(a) for a in answers)


def test_build_unties_and_scales_the_input_embeddings(seed0_runs: tuple[Path, Path]) -> None:
    """The default recipe gives the LM head its own matrix and unit-scale input embeddings."""
    weights = _weights(seed0_runs[0])
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    assert not torch.equal(embed, head)
    assert 0.8 < embed.float().std().item() < 1.2
    assert head.float().std().item() < 0.2


def test_shipped_template_is_verbatim_and_tokenizes_consistently() -> None:
    """The instruction appears verbatim; tokenizing the rendering adds no second BOS; several
    template tokens follow the instruction."""
    tok = AutoTokenizer.from_pretrained(ASSETS)
    instruction = "  Explain photosynthesis,\nplease!  "
    for msgs in (
        [{"role": "user", "content": instruction}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": instruction}],
    ):
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert instruction in text
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        assert ids == tok(text)["input_ids"]
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
        end = text.index(instruction) + len(instruction)
        post = tok(text[end:], add_special_tokens=False)["input_ids"]
        assert len(post) >= 3
        assert tok.eos_token_id in post


def test_shipped_model_loads_and_is_small() -> None:
    """The shipped model loads with ``from_pretrained``, has at most 8M parameters, stops at the
    end-of-turn token, and the assets fit in 10 MB."""
    model = LlamaForCausalLM.from_pretrained(ASSETS)
    tok = AutoTokenizer.from_pretrained(ASSETS)
    assert sum(p.numel() for p in model.parameters()) <= 8_000_000
    assert next(model.parameters()).dtype == torch.float32
    gen = GenerationConfig.from_pretrained(ASSETS)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert tok.eos_token_id in eos
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total <= 10 * 1024 * 1024


def test_shipped_recipe_is_the_default_config() -> None:
    """The shipped ``training_recipe.json`` is seed 0 plus exactly the current
    :class:`TinyChatConfig` defaults, so ``python -m tools.tinychat.build`` rebuilds it."""
    recipe = json.loads((ASSETS / "training_recipe.json").read_text())
    assert recipe.pop("seed") == 0
    recipe.pop("special_tokens")
    assert recipe == asdict(TinyChatConfig())
