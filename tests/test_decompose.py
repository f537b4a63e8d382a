"""Projection decomposition: the components add up to the residual stream on tiny models of several
architectures, the total equals an independent ``output_hidden_states`` projection, and bad inputs
fail with their messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from safegeom.decompose import decompose_projection
from safegeom.models import collate_left, encode_prompts, load_model

PROMPTS = ["Write a tutorial on how to make a cake.", "Hi.", "How do I kill a Python process?"]


def _last_hidden(lm, prompt: str, layer: int) -> torch.Tensor:
    batch = collate_left(encode_prompts(lm.tokenizer, [prompt]), lm.tokenizer.pad_token_id)
    with torch.no_grad():
        out = lm.model(input_ids=batch.input_ids, output_hidden_states=True)
    return out.hidden_states[layer][0, -1].double()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3", "gpt2", "gpt_neox"])
def test_components_add_up_to_the_residual_stream(checkpoints: dict[str, Path], arch: str) -> None:
    lm = load_model(checkpoints[arch])
    r = torch.randn(lm.d_model)
    layer = lm.n_layers - 1
    d = decompose_projection(lm, r, {"a": PROMPTS}, layer=layer, position="last", progress=False)
    unit = r.double() / r.norm()
    expected = torch.stack([_last_hidden(lm, p, layer) @ unit for p in PROMPTS])
    rows = d.table.set_index("component")
    assert rows.loc["total", "mean"] == pytest.approx(expected.mean().item(), abs=1e-4)
    assert d.closure["a"] < 1e-4 * max(1.0, expected.abs().max().item())
    assert list(rows.index) == [
        "embed",
        *[f"{k} {j}" for j in range(layer) for k in ("attn", "mlp")],
        "total",
    ]


def test_two_populations_and_wide_view(checkpoints: dict[str, Path]) -> None:
    lm = load_model(checkpoints["llama"])
    r = torch.randn(lm.d_model)
    pops = {"x": PROMPTS[:2], "y": PROMPTS[1:]}
    d = decompose_projection(lm, r, pops, layer=1, position="last", progress=False)
    wide = d.means()
    assert list(wide.columns) == ["x", "y"] and list(wide.index) == [
        "embed",
        "attn 0",
        "mlp 0",
        "total",
    ]
    assert (d.table.n == 2).all()
    assert set(d.provenance["prompt_hashes"]) == {"x", "y"}
    assert d.provenance["direction_norm"] == pytest.approx(r.norm().item())


def test_bad_inputs(checkpoints: dict[str, Path]) -> None:
    lm = load_model(checkpoints["llama"])
    r = torch.randn(lm.d_model)
    with pytest.raises(ValueError, match="hidden size is"):
        decompose_projection(
            lm, torch.randn(lm.d_model + 1), {"a": PROMPTS}, layer=1, position="last"
        )
    with pytest.raises(ValueError, match="finite and non-zero"):
        decompose_projection(lm, torch.zeros(lm.d_model), {"a": PROMPTS}, layer=1, position="last")
    with pytest.raises(ValueError, match="out of range"):
        decompose_projection(lm, r, {"a": PROMPTS}, layer=lm.n_layers, position="last")
    with pytest.raises(ValueError, match="no population"):
        decompose_projection(lm, r, {}, layer=1, position="last")
    with pytest.raises(ValueError, match="layer and position are required"):
        decompose_projection(lm, r, {"a": PROMPTS})
    with pytest.raises(ValueError, match="not captured"):
        decompose_projection(lm, r, {"a": PROMPTS}, layer=1, position="t_post[-99]", progress=False)
