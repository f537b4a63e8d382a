"""Safe LoRA's projection and LoX's extrapolation (docs/methods.md §8) equal their formulas."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safegeom.errors import ConfigError, NonFiniteError, NotFoundError, SafegeomError
from safegeom.training.weight_space import (
    alignment_matrix,
    apply_safe_lora,
    lox_extrapolate,
    lox_weights,
    safe_lora_project,
)

D = torch.float64


def test_alignment_matrix_by_hand() -> None:
    V = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=D)  # ‖V‖_F = 5
    expected = torch.tensor([[9.0, 0.0], [0.0, 16.0]], dtype=D) / 5
    assert torch.allclose(alignment_matrix(V), expected)


def test_safe_lora_projects_a_misaligned_update() -> None:
    V = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=D)  # C = e1 e1ᵀ / 1
    delta = torch.tensor([[1.0, 2.0, 0.0], [1.0, 0.0, 1.0]], dtype=D)
    # C Δ keeps the first row: [[1, 2, 0], [0, 0, 0]]; cos = 5 / (√7 · √5) = √5/√7.
    out, sim = safe_lora_project(delta, V, threshold=0.9)
    assert sim == pytest.approx((5 / 7) ** 0.5)
    assert torch.equal(out, torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]], dtype=D))
    kept, sim2 = safe_lora_project(delta, V, threshold=0.8)  # 0.845 ≥ 0.8: kept
    assert sim2 == sim and torch.equal(kept, delta)


def test_safe_lora_threshold_extremes_and_zero_update() -> None:
    g = torch.Generator().manual_seed(0)
    V, delta = torch.randn(4, 3, generator=g, dtype=D), torch.randn(4, 3, generator=g, dtype=D)
    never, sim = safe_lora_project(delta, V, threshold=0.0)
    assert torch.equal(never, delta) and 0.0 <= sim < 1.0
    always, _ = safe_lora_project(delta, V, threshold=1.0)
    assert torch.allclose(always, alignment_matrix(V) @ delta)
    zero, sim0 = safe_lora_project(torch.zeros(4, 3, dtype=D), V, threshold=1.0)
    assert sim0 == 1.0 and torch.equal(zero, torch.zeros(4, 3, dtype=D))


def test_safe_lora_keeps_dtype() -> None:
    out, _ = safe_lora_project(torch.ones(2, 2), torch.eye(2), threshold=1.0)
    assert out.dtype == torch.float32


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.integers(0, 10_000), st.floats(0.0, 1.0))
def test_safe_lora_equals_its_formula(out_dim: int, in_dim: int, seed: int, tau: float) -> None:
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(out_dim, in_dim, generator=g, dtype=D)
    delta = torch.randn(out_dim, in_dim, generator=g, dtype=D)
    C = V @ V.T / torch.linalg.norm(V)
    proj = C @ delta
    cos = float((proj * delta).sum() / (torch.linalg.norm(proj) * torch.linalg.norm(delta)))
    out, sim = safe_lora_project(delta, V, tau)
    assert sim == pytest.approx(cos, abs=1e-12)
    assert torch.allclose(out, proj if cos < tau else delta)


def test_safe_lora_bad_inputs() -> None:
    with pytest.raises(SafegeomError, match="same shape"):
        safe_lora_project(torch.ones(2, 3), torch.ones(3, 2), 0.5)
    with pytest.raises(
        ConfigError, match=r"threshold \(--threshold\) must be a number in \[0, 1\]"
    ):
        safe_lora_project(torch.ones(2, 2), torch.eye(2), 1.5)
    with pytest.raises(SafegeomError, match="V = W_aligned − W_unaligned is zero"):
        safe_lora_project(torch.ones(2, 2), torch.zeros(2, 2), 0.5)
    with pytest.raises(SafegeomError, match=r"2-D \[out, in\]"):
        safe_lora_project(torch.ones(2), torch.ones(2), 0.5)
    with pytest.raises(NonFiniteError, match="delta contains NaN"):
        safe_lora_project(torch.full((2, 2), float("nan")), torch.eye(2), 0.5)


def _peft_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    aligned = {k: v.detach().clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    unaligned = {k: v - 0.1 * torch.randn(v.shape, generator=g) for k, v in aligned.items()}
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=g)
    return model, aligned, unaligned


def test_apply_safe_lora_on_a_peft_model() -> None:
    model, aligned, unaligned = _peft_model()
    before = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            s = module.scaling["default"]
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            before[name] = (s * b.detach().double() @ a.detach().double(), module)
    report = apply_safe_lora(model, unaligned, threshold=1.0)
    assert len(report) == 4 and all(layer.projected for layer in report)
    for (name, (delta, module)), layer in zip(before.items(), report, strict=True):
        assert layer.name == name.removeprefix("base_model.model.") + ".weight"
        V = aligned[layer.name].double() - unaligned[layer.name].double()
        expected, _ = safe_lora_project(delta, V, 1.0)
        s = module.scaling["default"]
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        assert torch.allclose(s * b.double() @ a.double(), expected, atol=1e-5)
    kept = apply_safe_lora(model, unaligned, aligned=aligned, threshold=0.0)
    assert not any(layer.projected for layer in kept)


def test_apply_safe_lora_bad_inputs() -> None:
    model, _, unaligned = _peft_model()
    with pytest.raises(ConfigError, match="pass --unaligned-base MODEL"):
        apply_safe_lora(model, None)
    missing = {k: v for k, v in unaligned.items() if "layers.0.self_attn.q_proj" not in k}
    with pytest.raises(NotFoundError, match="--unaligned-base has no weight"):
        apply_safe_lora(model, missing)
    with pytest.raises(ConfigError, match="no LoRA layer"):
        apply_safe_lora(torch.nn.Linear(2, 2), unaligned)


def test_lox_by_hand() -> None:
    base = torch.zeros(2, 2, dtype=D)
    align = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=D)  # Δ = diag(3, 1); U_1 = e1
    assert torch.allclose(
        lox_extrapolate(align, base, 1, 0.5), torch.tensor([[4.5, 0], [0, 1.0]], dtype=D)
    )
    # k ≥ rank (and k > min(out, in)): the whole update.
    assert torch.allclose(lox_extrapolate(align, base, 2, 0.5), 1.5 * align)
    assert torch.allclose(lox_extrapolate(align, base, 7, 0.5), 1.5 * align)
    assert torch.equal(lox_extrapolate(align, align, 1, 2.0), align)  # zero update
    assert torch.equal(lox_extrapolate(align, base, 1, 0.0), align)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 5),
    st.integers(1, 6),
    st.floats(0.0, 3.0),
    st.integers(0, 9999),
)
def test_lox_equals_its_formula(out_dim: int, in_dim: int, k: int, alpha: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    W_base = torch.randn(out_dim, in_dim, generator=g, dtype=D)
    W_align = W_base + torch.randn(out_dim, in_dim, generator=g, dtype=D)
    delta = W_align - W_base
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    kk = min(k, len(s))
    rank_k = u[:, :kk] @ torch.diag(s[:kk]) @ vh[:kk]  # U_k U_kᵀ Δ = top-k truncated SVD
    assert torch.allclose(lox_extrapolate(W_align, W_base, k, alpha), W_align + alpha * rank_k)


def test_lox_bad_inputs() -> None:
    eye = torch.eye(2)
    with pytest.raises(ConfigError, match=r"k \(--k\) must be an integer ≥ 1, got 0"):
        lox_extrapolate(eye, eye, 0, 1.0)
    with pytest.raises(ConfigError, match=r"alpha \(--alpha\) must be a finite number ≥ 0"):
        lox_extrapolate(eye, eye, 1, -0.5)
    with pytest.raises(ConfigError, match="alpha"):
        lox_extrapolate(eye, eye, 1, float("nan"))
    with pytest.raises(SafegeomError, match="same shape"):
        lox_extrapolate(eye, torch.eye(3), 1, 1.0)
    with pytest.raises(ConfigError, match=r"LoX needs the unaligned base.*--unaligned-base"):
        lox_extrapolate(eye, None, 1, 1.0)  # type: ignore[arg-type]


def test_lox_weights_on_a_state_dict() -> None:
    aligned = {"w": torch.tensor([[2.0, 0.0], [0.0, 1.0]]), "b": torch.ones(2)}
    unaligned = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    out = lox_weights(aligned, unaligned, k=1, alpha=1.0)
    assert torch.allclose(out["w"], torch.tensor([[4.0, 0.0], [0.0, 1.0]]))
    assert out["b"] is aligned["b"]
    with pytest.raises(ConfigError, match="--unaligned-base"):
        lox_weights(aligned, None, k=1, alpha=1.0)
    with pytest.raises(NotFoundError, match="--unaligned-base has no weight 'v'"):
        lox_weights({**aligned, "v": torch.eye(2)}, unaligned, k=1, alpha=1.0, names=["v"])
