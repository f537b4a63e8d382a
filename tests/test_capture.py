"""Capture equals output_hidden_states, is padding-invariant, cleans up, streams, and round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from safegeom.activations import (
    CaptureConfig,
    capture,
    capture_stats,
    capture_to_disk,
    plan_capture,
)
from safegeom.activations.values import load_activations
from safegeom.models import LoadConfig, collate_left, encode_prompts, load_model
from safegeom.prompts import load_prompts

PROMPTS = [
    "Write a tutorial on how to make a cake.",
    "Hi.",
    "Explain how photosynthesis works in plants, step by step, for a child.",
    "How do I kill a Python process?",
]
ALL_SITES = ["resid_pre", "resid_post", "attn_out", "mlp_out"]


def _hidden_states(lm, prompt: str) -> tuple[torch.Tensor, ...]:
    enc = encode_prompts(lm.tokenizer, [prompt])
    batch = collate_left(enc, lm.tokenizer.pad_token_id)
    with torch.no_grad():
        out = lm.model(input_ids=batch.input_ids, output_hidden_states=True)
    return tuple(h[0] for h in out.hidden_states)


@pytest.mark.parametrize(
    "arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "gpt_neox"]
)
def test_capture_equals_output_hidden_states(checkpoints: dict[str, Path], arch: str) -> None:
    lm = load_model(checkpoints[arch])
    acts = capture(
        lm,
        PROMPTS,
        CaptureConfig(sites=["resid_pre", "resid_post"], positions="t_inst,t_post"),
        progress=False,
    )
    n_post = len(acts.positions) - 1
    for i, prompt in enumerate(PROMPTS):
        hs = _hidden_states(lm, prompt)
        enc = encode_prompts(lm.tokenizer, [prompt])[0]
        rows = [enc.t_inst, *range(len(enc) - n_post, len(enc))]
        for layer in range(lm.n_layers):
            torch.testing.assert_close(
                acts["resid_pre"][i, layer], hs[layer][rows], atol=1e-5, rtol=0
            )
            if layer < lm.n_layers - 1:  # the last hidden state has the final norm applied
                torch.testing.assert_close(
                    acts["resid_post"][i, layer], hs[layer + 1][rows], atol=1e-5, rtol=0
                )


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_alone_equals_in_padded_batch(checkpoints: dict[str, Path], arch: str) -> None:
    lm = load_model(checkpoints[arch])
    batch = capture(
        lm,
        PROMPTS,
        CaptureConfig(sites=ALL_SITES, positions="t_inst,last,0", batch_size=4),
        progress=False,
    )
    for i, prompt in enumerate(PROMPTS):
        alone = capture(
            lm, [prompt], CaptureConfig(sites=ALL_SITES, positions="t_inst,last,0"), progress=False
        )
        for site in ALL_SITES:
            torch.testing.assert_close(batch[site][i], alone[site][0], atol=1e-5, rtol=1e-5)


def test_sites_sum_to_residual(checkpoints: dict[str, Path]) -> None:
    lm = load_model(checkpoints["llama"])
    acts = capture(lm, PROMPTS, CaptureConfig(sites=ALL_SITES, positions="t_post"), progress=False)
    total = acts["resid_pre"] + acts["attn_out"] + acts["mlp_out"]
    torch.testing.assert_close(total, acts["resid_post"], atol=1e-5, rtol=1e-5)


def test_stops_after_last_layer_and_skips_lm_head(checkpoints: dict[str, Path]) -> None:
    lm = load_model(checkpoints["llama"])
    calls: list[str] = []
    handles = [
        lm.blocks[2].register_forward_hook(lambda *a: calls.append("block2")),
        lm.model.lm_head.register_forward_hook(lambda *a: calls.append("head")),
        lm.model.model.norm.register_forward_hook(lambda *a: calls.append("norm")),
    ]
    try:
        capture(lm, PROMPTS, CaptureConfig(layers="0:2", sites="resid_post"), progress=False)
        assert calls == []
        capture(lm, PROMPTS, CaptureConfig(layers="-1", sites="resid_pre"), progress=False)
        assert calls == []
    finally:
        for h in handles:
            h.remove()


def test_hooks_removed_after_exception(checkpoints: dict[str, Path]) -> None:
    lm = load_model(checkpoints["llama"])

    def count() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())

    before = count()
    boom = lm.blocks[1].mlp.register_forward_hook(
        lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
    )
    try:
        with pytest.raises(RuntimeError, match="boom"):
            capture(lm, PROMPTS, CaptureConfig(sites=ALL_SITES), progress=False)
    finally:
        boom.remove()
    assert count() == before


def test_storage_dtype_and_provenance(checkpoints: dict[str, Path]) -> None:
    lm = load_model(checkpoints["qwen2"])
    acts = capture(
        lm,
        PROMPTS,
        CaptureConfig(dtype=torch.bfloat16, layers="1", positions="last"),
        progress=False,
    )
    assert acts["resid_pre"].dtype == torch.bfloat16
    prov = acts.provenance
    assert prov["weight_hash"] == lm.weight_hash and prov["n_prompts"] == 4
    assert prov["layers"] == [1] and prov.extra["layers"] == [1]
    assert prov["positions"] == ["last"] and prov["dtype"] == "bfloat16"
    assert list(prov.prompt_sets.values()) == [load_prompts(PROMPTS).content_hash]
    assert prov["backend"] == "hooks" and prov.config["dtype"] == "bfloat16"


def test_streaming_stats_equal_full_tensor(checkpoints: dict[str, Path]) -> None:
    lm = load_model(checkpoints["llama"])
    prompts = PROMPTS * 3
    full = capture(
        lm,
        prompts,
        CaptureConfig(sites=["resid_pre", "mlp_out"], positions="t_inst,last", batch_size=5),
        progress=False,
    )
    stats = capture_stats(
        lm,
        prompts,
        CaptureConfig(
            sites=["resid_pre", "mlp_out"],
            positions="t_inst,last",
            stats=True,
            covariance=True,
            batch_size=5,
        ),
        progress=False,
    )
    for site in ("resid_pre", "mlp_out"):
        x = full[site].double()
        torch.testing.assert_close(stats.mean(site), x.mean(0), atol=1e-10, rtol=0)
        centred = x - x.mean(0)
        cov = torch.einsum("nlpi,nlpj->lpij", centred, centred) / (x.shape[0] - 1)
        torch.testing.assert_close(stats.moments[site].cov, cov, atol=1e-9, rtol=0)


def test_save_load_roundtrip_and_shards(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    lm = load_model(checkpoints["gpt_neox"])
    acts = capture(
        lm,
        PROMPTS,
        CaptureConfig(sites=["resid_pre", "attn_out"], positions="t_post"),
        progress=False,
    )
    path = acts.save(tmp_path / "acts.safetensors")
    back = load_activations(path)
    assert back.layers == acts.layers and back.positions == acts.positions
    assert back.provenance == acts.provenance
    for site in acts.sites:
        assert torch.equal(back[site], acts[site])
    assert json.loads(Path(f"{path}.json").read_text())["provenance"]["extra"]["n_prompts"] == 4
    folder = capture_to_disk(
        lm,
        PROMPTS,
        tmp_path / "shards",
        CaptureConfig(sites=["resid_pre", "attn_out"], shard_size=2, batch_size=2),
        progress=False,
    )
    assert len(list(folder.glob("shard-*.safetensors"))) == 2
    sharded = load_activations(folder)
    for site in acts.sites:
        torch.testing.assert_close(sharded[site], acts[site], atol=1e-6, rtol=0)
    assert sharded.select("attn_out", 1, "t_post[-1]").shape == (4, lm.d_model)


def test_peft_adapter_captures_like_merged(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base = load_model(checkpoints["qwen2"])
    peft_model = get_peft_model(
        base.model, LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "up_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    # float64: merged weights (W + BA) and the separate LoRA path round differently in float32
    # (1.4e-5 on activations of O(1) after three layers); in float64 they agree to 1e-12.
    applied = load_model(tmp_path / "adapter", LoadConfig(dtype="float64"))
    merged = load_model(tmp_path / "adapter", LoadConfig(merge_adapter=True, dtype="float64"))
    a = capture(
        applied, PROMPTS, CaptureConfig(sites=ALL_SITES, positions="t_inst,t_post"), progress=False
    )
    b = capture(
        merged, PROMPTS, CaptureConfig(sites=ALL_SITES, positions="t_inst,t_post"), progress=False
    )
    plain = capture(
        load_model(checkpoints["qwen2"]),
        PROMPTS,
        CaptureConfig(sites="resid_post", positions="t_inst,t_post"),
        progress=False,
    )
    for site in ALL_SITES:
        torch.testing.assert_close(a[site], b[site], atol=1e-5, rtol=1e-5)
    assert (a["resid_post"] - plain["resid_post"]).abs().max() > 1e-3


def test_bad_inputs(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    lm = load_model(checkpoints["llama"])
    with pytest.raises(ValueError, match="prompt set 'inline' is empty"):
        capture(lm, [], progress=False)
    with pytest.raises(ValueError, match=r"unknown site\(s\) \['resid_mid'\]"):
        capture(lm, PROMPTS, CaptureConfig(sites="resid_mid"), progress=False)
    with pytest.raises(ValueError, match="layer 7 out of range: the model has 3 layers"):
        capture(lm, PROMPTS, CaptureConfig(layers="7"), progress=False)
    with pytest.raises(ValueError, match="unknown position 'first'"):
        capture(lm, PROMPTS, CaptureConfig(positions="first"), progress=False)
    with pytest.raises(ValueError, match="unknown capture backend 'jax'"):
        capture(lm, PROMPTS, CaptureConfig(backend="jax"), progress=False)
    with pytest.raises(ValueError, match=r"batch_size \(--batch-size\) must be at least 1"):
        plan_capture(lm, PROMPTS, CaptureConfig(batch_size=0))
    with pytest.raises(FileNotFoundError, match="no activations at"):
        load_activations(tmp_path / "missing.safetensors")


def test_nan_activations_are_reported(checkpoints: dict[str, Path]) -> None:
    lm = load_model(checkpoints["llama"])
    with torch.no_grad():
        lm.blocks[0].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN or inf in captured activations"):
        capture(lm, PROMPTS, CaptureConfig(layers="1"), progress=False)
