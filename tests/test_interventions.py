"""Interventions: ablation zeroes the direction, equals weight orthogonalisation, restores the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from safegeom.activations import CaptureConfig, capture
from safegeom.interventions import (
    ablate,
    ablate_rows,
    add,
    add_rows,
    affine_edit,
    orthogonalize_weights,
)
from safegeom.models import load_model
from tests.model_helpers import hook_count, prompt_logits

PROMPTS = ["Write a tutorial on how to make a cake.", "Hi.", "How do I kill a Python process?"]
SITES = ["resid_pre", "resid_post", "attn_out", "mlp_out"]


def _logits(lm, prompts=PROMPTS) -> torch.Tensor:
    return prompt_logits(lm, prompts)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_ablation_removes_direction_everywhere(checkpoints: dict[str, Path], arch: str) -> None:
    lm = load_model(checkpoints[arch])
    r = torch.randn(lm.d_model)
    with ablate(lm, r):
        acts = capture(
            lm, PROMPTS, CaptureConfig(sites=SITES, positions="t_inst,t_post"), progress=False
        )
    unit = r / r.norm()
    for site in ("resid_pre", "attn_out", "mlp_out"):
        assert (acts[site] @ unit).abs().max() < 1e-4, site
    # resid_post = resid_pre + attn + mlp, all ablated
    assert (acts["resid_post"] @ unit).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "gpt_neox"])
def test_hook_ablation_equals_orthogonalized_weights(
    checkpoints: dict[str, Path], arch: str
) -> None:
    lm = load_model(checkpoints[arch])
    r = torch.randn(lm.d_model)
    with ablate(lm, r):
        hooked = _logits(lm)
    edited = orthogonalize_weights(lm, r)
    torch.testing.assert_close(_logits(edited), hooked, atol=1e-4, rtol=1e-4)
    assert (_logits(lm) - hooked).abs().max() > 1e-3  # the original is untouched and differs


def test_orthogonalized_subspace_and_tied_embeddings(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    lm = load_model(checkpoints["llama"])
    basis = torch.randn(lm.d_model, 3)
    with ablate(lm, basis):
        hooked = _logits(lm)
    edited = orthogonalize_weights(lm, basis)
    torch.testing.assert_close(_logits(edited), hooked, atol=1e-4, rtol=1e-4)
    edited.model.save_pretrained(tmp_path / "ortho")
    lm.tokenizer.save_pretrained(tmp_path / "ortho")
    reloaded = load_model(tmp_path / "ortho")
    torch.testing.assert_close(_logits(reloaded), hooked, atol=1e-4, rtol=1e-4)


def test_post_norm_architecture_refuses_inexact_edit(checkpoints: dict[str, Path]) -> None:
    lm = load_model(checkpoints["gemma2"])
    with pytest.raises(ValueError, match="pass allow_inexact=True"):
        orthogonalize_weights(lm, torch.randn(lm.d_model))


def test_interventions_restore_model_exactly(checkpoints: dict[str, Path]) -> None:
    lm = load_model(checkpoints["llama"])
    before_state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    before_logits, before_hooks = _logits(lm), hook_count(lm)
    r = torch.randn(lm.d_model)
    contexts = [
        lambda: ablate(lm, r),
        lambda: add(lm, r, layers=1, coeff=2.0),
        lambda: add(lm, r, layers="all", positions="instruction"),
        lambda: affine_edit(lm, r, torch.zeros(lm.d_model), alpha=1.0),
        lambda: ablate_rows(lm, torch.randn(3, lm.d_model)),
        lambda: add_rows(lm, torch.randn(3, lm.d_model), [0, 1, 2]),
    ]
    for make in contexts:
        with make():
            assert hook_count(lm) > before_hooks
            assert (_logits(lm) - before_logits).abs().max() > 1e-4
        assert hook_count(lm) == before_hooks
        torch.testing.assert_close(_logits(lm), before_logits, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="inside"), ablate(lm, r):
        raise RuntimeError("inside")
    assert hook_count(lm) == before_hooks
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before_state[k]), k


def test_row_wise_equals_one_at_a_time(checkpoints: dict[str, Path]) -> None:
    lm = load_model(checkpoints["qwen2"])
    dirs = torch.randn(2, lm.d_model)
    prompt = PROMPTS[:1]
    with ablate_rows(lm, dirs):
        rows = _logits(lm, prompt * 2)
    for i in range(2):
        with ablate(lm, dirs[i]):
            torch.testing.assert_close(rows[i : i + 1], _logits(lm, prompt), atol=1e-5, rtol=1e-5)
    with add_rows(lm, dirs, [0, 2]):
        rows = _logits(lm, prompt * 2)
    for i, layer in enumerate([0, 2]):
        with add(lm, dirs[i], layers=layer):
            torch.testing.assert_close(rows[i : i + 1], _logits(lm, prompt), atol=1e-5, rtol=1e-5)


def test_instruction_only_addition_leaves_template_positions(checkpoints: dict[str, Path]) -> None:
    lm = load_model(checkpoints["llama"])
    r = torch.randn(lm.d_model) * 5
    base = capture(
        lm,
        PROMPTS,
        CaptureConfig(sites="resid_pre", layers="1", positions="t_inst,last"),
        progress=False,
    )
    with add(lm, r, layers=1, positions="instruction"):
        moved = capture(
            lm,
            PROMPTS,
            CaptureConfig(sites="resid_pre", layers="1", positions="t_inst,last"),
            progress=False,
        )
    delta = moved["resid_pre"] - base["resid_pre"]
    torch.testing.assert_close(
        delta[:, 0, 0], r.expand(3, -1), atol=1e-4, rtol=1e-4
    )  # t_inst moved
    assert delta[:, 0, 1].abs().max() < 1e-6  # last template token untouched at its own layer


def test_affine_edit_sets_coordinate(checkpoints: dict[str, Path]) -> None:
    lm = load_model(checkpoints["gpt2"])
    r = torch.randn(lm.d_model)
    mu = torch.randn(lm.d_model)
    with affine_edit(lm, r, mu, alpha=0.5, layers="1"):
        acts = capture(
            lm,
            PROMPTS,
            CaptureConfig(sites="resid_pre", layers="1", positions="t_post"),
            progress=False,
        )
    unit = r / r.norm()
    coords = acts["resid_pre"] @ unit
    torch.testing.assert_close(
        coords, torch.full_like(coords, float(mu @ unit) + 0.5), atol=1e-4, rtol=0
    )


def test_bad_inputs(checkpoints: dict[str, Path]) -> None:
    lm = load_model(checkpoints["llama"])
    with (
        pytest.raises(ValueError, match="hidden-size mismatch: carrier has shape \\(7,\\)"),
        ablate(lm, torch.ones(7)),
    ):
        pass
    with (
        pytest.raises(ValueError, match="cannot ablate a zero vector"),
        ablate(lm, torch.zeros(lm.d_model)),
    ):
        pass
    with (
        pytest.raises(ValueError, match="layer 9 out of range"),
        add(lm, torch.ones(lm.d_model), layers=9),
    ):
        pass
    with (
        pytest.raises(ValueError, match="unknown positions 'tail'"),
        add(lm, torch.ones(lm.d_model), layers=0, positions="tail"),
    ):  # type: ignore[arg-type]
        pass
