"""The RefusalGuard edit: Φ keeps the cone coordinates, is the identity at zero, finds its positions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safegeom.errors import ConfigError, SafegeomError
from safegeom.hooks import Hook, attach
from safegeom.models import collate_left, encode_prompts, load_model
from safegeom.models.reft import ReftConfig, ReftEdit, ReftLayer, orthonormal_rows
from tests.model_helpers import hook_count, prompt_logits
from tests.tiny_models import build_checkpoint

PROMPTS = ["Write a tutorial on how to make a cake.", "Hi.", "How do I kill a Python process?"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("reft"), "llama")


@pytest.fixture(scope="module")
def tiny_chat():
    return load_model("tiny-chat")


def _bases(d: int, layers, k: int = 3, seed: int = 0) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {x: torch.linalg.qr(torch.randn(d, k, generator=g))[0] for x in layers}


def _logits(lm, prompts=PROMPTS) -> torch.Tensor:
    return prompt_logits(lm, prompts)


def _perturb(edit: ReftEdit, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in edit.edits.values():
            module.weight.add_(scale * torch.randn(module.weight.shape, generator=g))
            module.bias.add_(torch.randn(module.bias.shape, generator=g))


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(4, 24),
    k=st.integers(1, 4),
    r=st.integers(1, 4),
    seed=st.integers(0, 10_000),
    scale=st.floats(0.01, 100.0),
)
def test_edit_never_moves_the_cone_coordinates(d: int, k: int, r: int, seed: int, scale: float):
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, k, generator=g))[0]
    layer = ReftLayer(basis, r, g)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(r, d, generator=g) * scale)
        layer.bias.copy_(torch.randn(r, generator=g) * scale)
    h = torch.randn(5, 7, d, generator=g) * scale
    edited = h + layer(h)
    bound = 1e-4 * (1 + h.abs().max() + (edited - h).abs().max())
    assert ((edited - h) @ basis).abs().max() <= bound
    rot = layer.rotation
    assert torch.allclose(rot @ rot.T, torch.eye(r), atol=1e-5)  # orthonormal rows


def test_a_column_major_basis_is_stored_row_major() -> None:
    """QR returns a column-major Q; the layer stores its basis row-major, as a checkpoint loads
    it, so the edit in memory and the edit read back run the same kernels: equal bit for bit
    (with the strides kept, tiny-chat's logits differed by 3.8e-6)."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 2, generator=g))[0]
    assert not basis.is_contiguous()
    layer = ReftLayer(basis, 3, g)
    assert layer.basis.is_contiguous() and torch.equal(layer.basis, basis)
    again = ReftLayer(basis.contiguous(), 3, torch.Generator().manual_seed(0))
    again.load_state_dict(layer.state_dict())
    h = torch.randn(4, 5, 16, generator=g)
    with torch.no_grad():
        assert torch.equal(layer(h), again(h))


def test_rotation_is_qr_of_the_free_matrix_with_positive_diagonal() -> None:
    free = torch.randn(3, 8)
    rot = orthonormal_rows(free)
    coef = free @ rot.T  # free = coef · R, coef lower triangular with a positive diagonal
    assert torch.allclose(coef @ rot, free, atol=1e-5)
    assert bool((torch.diagonal(coef) > 0).all())
    assert torch.allclose(torch.triu(coef, 1), torch.zeros(3, 3), atol=1e-5)


@pytest.mark.parametrize("site", ["resid_pre", "resid_post"])
def test_zero_init_is_the_base_model_exactly(llama: Path, tiny_chat, site: str) -> None:
    for lm in (load_model(llama), tiny_chat):
        base = _logits(lm)
        config = ReftConfig(layers=(0, 1), rank=3, site=site, first_k=2, last_k=2)
        edit = ReftEdit.for_model(lm, config, _bases(lm.d_model, (0, 1)))
        with edit.on(lm):
            assert torch.equal(_logits(lm), base)
            _perturb(edit)
            assert not torch.allclose(_logits(lm), base, atol=1e-3)  # the hooks do act
        assert torch.equal(_logits(lm), base)
        edit.reset()
        with edit.on(lm):
            assert torch.equal(_logits(lm), base)


def test_positions_under_left_padding_match_each_prompt_alone(tiny_chat) -> None:
    lm = tiny_chat
    edit = ReftEdit.for_model(lm, ReftConfig(layers=(1,), first_k=2, last_k=3), _bases(256, (1,)))
    _perturb(edit)
    seen: list[torch.Tensor] = []
    probe = Hook(lm.blocks[2], "pre", lambda h: seen.append(h.detach().clone()))
    encoded = encode_prompts(lm.tokenizer, PROMPTS)
    with edit.on(lm), attach([probe]), torch.no_grad():
        for prompts in (PROMPTS, *([p] for p in PROMPTS)):
            batch = collate_left(
                [e for e, p in zip(encoded, PROMPTS, strict=True) if p in prompts],
                lm.tokenizer.pad_token_id,
            )
            lm.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
            )
    padded, alone = seen[0], seen[1:]
    with attach([probe]), torch.no_grad():
        _logits(lm)
    assert not torch.allclose(seen[-1], padded, atol=1e-3)  # the edit moved the activations
    for row, single in enumerate(alone):
        n = single.shape[1]
        assert torch.allclose(padded[row, -n:], single[0], atol=1e-4)


def test_edited_positions_first_and_last_real_tokens() -> None:
    config = ReftConfig(layers=(0,), rank=1, first_k=2, last_k=1)
    edit = ReftEdit(config, _bases(4, (0,), k=1), 4)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    expected = torch.tensor([[0, 0, 1, 1, 0, 1], [1, 1, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1]]).bool()
    assert torch.equal(edit.edited_positions(mask, cached=False), expected)
    assert not edit.edited_positions(mask, cached=True).any()  # generated tokens: left alone
    with edit.prompt_lengths([3, 4, 1]):  # prompt + answer in one pass
        got = edit.edited_positions(mask, cached=False)
    expected = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1]]).bool()
    assert torch.equal(got, expected)
    every = ReftEdit(ReftConfig(layers=(0,), rank=1, edit_generated=True), _bases(4, (0,), k=1), 4)
    assert torch.equal(every.edited_positions(mask, cached=True), mask.bool())


@pytest.mark.parametrize("edit_generated", [False, True])
def test_generation_steps_are_edited_only_when_asked(tiny_chat, edit_generated: bool) -> None:
    from safegeom.generation import generate

    lm = tiny_chat
    config = ReftConfig(layers=(1,), rank=2, edit_generated=edit_generated)
    edit = ReftEdit.for_model(lm, config, _bases(256, (1,)))
    zero = edit.layer(1).forward
    lengths: list[int] = []
    edit.layer(1).forward = lambda h: (lengths.append(h.shape[1]), zero(h))[1]
    with edit.on(lm):
        generate(lm, PROMPTS[:2], max_new_tokens=4, progress=False)
    assert lengths[0] > 1  # the prompt pass
    assert (1 in lengths) == edit_generated  # cached steps run the edit only when asked


def test_hooks_are_removed_after_an_exception(tiny_chat) -> None:
    lm = tiny_chat
    before, base = hook_count(lm), _logits(lm)
    edit = ReftEdit.for_model(lm, ReftConfig(layers=(0, 2)), _bases(256, (0, 2)))
    _perturb(edit)
    with pytest.raises(RuntimeError, match="boom"), edit.on(lm):
        assert hook_count(lm) == before + 3  # the decoder's mask capture + one per layer
        raise RuntimeError("boom")
    assert hook_count(lm) == before
    mid_forward = pytest.raises(SafegeomError, match="prompt_lengths has 1 rows")
    with mid_forward, edit.on(lm), edit.prompt_lengths([3]):
        _logits(lm)
    assert hook_count(lm) == before and torch.equal(_logits(lm), base)
    handle = edit.attach(lm)
    handle.remove()
    handle.remove()  # idempotent
    assert hook_count(lm) == before


def test_parameters_are_trainable_with_the_base_frozen(tiny_chat) -> None:
    lm = tiny_chat
    edit = ReftEdit.for_model(lm, ReftConfig(layers=(1, 2), rank=2), _bases(256, (1, 2)))
    names = sorted(n for n, _ in edit.named_parameters())
    assert names == sorted(f"edits.{x}.{p}" for x in (1, 2) for p in ("bias", "free", "weight"))
    batch = collate_left(encode_prompts(lm.tokenizer, PROMPTS), lm.tokenizer.pad_token_id)
    with edit.on(lm):
        logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logits.float().pow(2).mean().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in edit.parameters())
    assert all(p.grad is None for p in lm.model.parameters() if not p.requires_grad)
    lm.model.zero_grad(set_to_none=True)


def test_bad_inputs_fail_with_their_messages(tiny_chat, llama: Path) -> None:
    lm = tiny_chat
    good = _bases(256, (1,))
    with pytest.raises(SafegeomError, match=r"shape \(32, 3\), but the hidden size is 256"):
        ReftEdit.for_model(lm, ReftConfig(layers=(1,)), _bases(32, (1,)))
    with pytest.raises(ConfigError, match=r"layers \(--layers\) must be below the model's 4"):
        ReftEdit.for_model(lm, ReftConfig(layers=(4,)), _bases(256, (4,)))
    with pytest.raises(SafegeomError, match="is not orthonormal"):
        ReftEdit.for_model(lm, ReftConfig(layers=(1,)), {1: 2 * good[1]})
    with pytest.raises(ConfigError, match=r"rank \(--rank\) must be at least 1, got 0"):
        ReftConfig(layers=(1,), rank=0)
    with pytest.raises(ConfigError, match="must be at most the hidden size 256, got 300"):
        ReftEdit.for_model(lm, ReftConfig(layers=(1,), rank=300), good)
    with pytest.raises(SafegeomError, match=r"cone bases are for layers \[1\] but the edit is"):
        ReftEdit.for_model(lm, ReftConfig(layers=(1, 2)), good)
    with pytest.raises(ConfigError, match="no position would be edited"):
        ReftConfig(layers=(1,), first_k=0, last_k=0)
    with pytest.raises(ConfigError, match="must not repeat a layer"):
        ReftConfig(layers=(1, 1))
    with pytest.raises(ConfigError, match=r"site .* must be resid_pre or resid_post"):
        ReftConfig(layers=(1,), site="attn_out")  # type: ignore[arg-type]
    edit = ReftEdit.for_model(lm, ReftConfig(layers=(1,)), good)
    with edit.on(lm), pytest.raises(SafegeomError, match="already attached"):
        edit.attach(lm)
    small = load_model(llama)
    with pytest.raises(SafegeomError, match="built for hidden size 256, the model has 32"):
        edit.attach(small)
