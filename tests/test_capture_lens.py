"""The transformer_lens backend gives the same activations as safegeom's own hooks."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformer_lens")

from safegeom.activations import CaptureConfig, capture
from safegeom.activations.transformer_lens import bridge_hook_name, transformer_lens_bridge
from safegeom.models import LAYOUTS, LoadConfig, LoadedModel, load_model
from tests.tiny_models import ARCHS

SITES = "resid_pre,resid_post,attn_out,mlp_out"
POSITIONS = "t_inst,t_post,last"
# Different lengths, so every batch is left-padded.
PROMPTS = [
    "Write a tutorial on how to make a cake.",
    "Hi",
    "Explain how photosynthesis works in plants, in simple words and with an example.",
    "How do I kill a Python process?",
    "Give three tips.",
]
# TransformerBridge recomputes attention itself (for its pattern hooks), so float32 results
# differ from HF's kernels by rounding only; activations here are O(10).
TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def models(checkpoints: dict[str, Path]) -> Callable[[str], LoadedModel]:
    """Load one tiny float32 CPU model per architecture, once for this module."""

    @functools.cache
    def load(arch: str) -> LoadedModel:
        return load_model(checkpoints[arch], LoadConfig(dtype="float32", device="cpu"))

    return load


def _both(lm: LoadedModel, **kwargs) -> tuple:
    common = {"sites": SITES, "positions": POSITIONS, "dtype": torch.float32}
    common.update(kwargs)
    return capture(lm, PROMPTS, CaptureConfig(backend="hooks", **common), progress=False), capture(
        lm, PROMPTS, CaptureConfig(backend="transformer_lens", **common), progress=False
    )


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lens_equals_hooks(models: Callable[[str], LoadedModel], arch: str) -> None:
    lm = models(arch)
    hooks, lens = _both(lm, layers="all", batch_size=3)
    assert lens.layers == hooks.layers == tuple(range(lm.n_layers))
    assert lens.positions == hooks.positions
    assert lens.provenance["backend"] == "transformer_lens"
    for site in SITES.split(","):
        assert lens.data[site].shape == hooks.data[site].shape
        assert lens.data[site].dtype == torch.float32
        torch.testing.assert_close(lens.data[site], hooks.data[site], **TOL)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lens_stops_early_and_matches(models: Callable[[str], LoadedModel], arch: str) -> None:
    """Layers short of the last use ``stop_at_layer``; results must not change."""
    hooks, lens = _both(models(arch), layers="0,1", batch_size=len(PROMPTS))
    for site in SITES.split(","):
        torch.testing.assert_close(lens.data[site], hooks.data[site], **TOL)


def test_lens_padded_equals_alone(models: Callable[[str], LoadedModel]) -> None:
    lm = models("qwen2")
    kwargs = {"sites": SITES, "layers": "all", "positions": POSITIONS}
    batched = capture(
        lm,
        PROMPTS,
        CaptureConfig(backend="transformer_lens", batch_size=len(PROMPTS), **kwargs),
        progress=False,
    )
    alone = capture(
        lm,
        PROMPTS,
        CaptureConfig(backend="transformer_lens", batch_size=1, **kwargs),
        progress=False,
    )
    for site in SITES.split(","):
        torch.testing.assert_close(batched.data[site], alone.data[site], **TOL)


def test_lens_leaves_model_alone_and_caches_bridge(models: Callable[[str], LoadedModel]) -> None:
    lm = models("llama")
    before = [type(m) for m in lm.model.modules()]
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    bridge = transformer_lens_bridge(lm)
    assert transformer_lens_bridge(lm) is bridge  # cached per model
    _both(lm, layers="-1", batch_size=2)
    assert [type(m) for m in lm.model.modules()] == before  # the bridge wraps a clone
    after = lm.model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert transformer_lens_bridge(lm) is bridge


def test_lens_sees_in_place_weight_edits(models: Callable[[str], LoadedModel]) -> None:
    lm = models("mistral")
    transformer_lens_bridge(lm)  # built before the edit
    weight = lm.blocks[0].mlp.down_proj.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(-2.0)
        hooks, lens = _both(lm, layers="0,1", batch_size=len(PROMPTS))
        for site in SITES.split(","):
            torch.testing.assert_close(lens.data[site], hooks.data[site], **TOL)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_lens_errors_name_the_hooks_backend(models: Callable[[str], LoadedModel]) -> None:
    bridge = transformer_lens_bridge(models("llama"))
    assert bridge_hook_name(bridge, "resid_pre", 1) == "blocks.1.hook_resid_pre"
    with pytest.raises(ValueError, match='backend="hooks"'):
        bridge_hook_name(bridge, "resid_pre", 99)
    not_hf = LoadedModel(
        model=nn.Linear(4, 4),
        tokenizer=None,
        name="custom",
        source="memory",
        layout=LAYOUTS["llama"],
    )
    with pytest.raises(ValueError, match='backend="hooks"'):
        transformer_lens_bridge(not_hf)
