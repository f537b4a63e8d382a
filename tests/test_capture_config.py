"""CaptureConfig checks every field; capture takes a config, its fields, or an encoded set."""

from __future__ import annotations

import dataclasses
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
from safegeom.config import field_docs
from safegeom.errors import ConfigError, OutputPathError, SafegeomError
from safegeom.models import LayerSpec, PositionSpec, load_model
from safegeom.models.chat import encode_set
from safegeom.prompts import load_prompts

PROMPTS = ["Write a poem about the sea.", "Hi.", "How do I bake bread at home?"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"shard_size": 0},
            r"shard_size \(--shard-size\) must be a positive number of prompts, got 0",
        ),
        ({"shard_size": -5}, r"shard_size \(--shard-size\) must be a positive number .*got -5"),
        ({"covariance": True}, r"covariance \(--covariance\) needs --stats"),
        (
            {"stats": True, "shard_size": 8},
            r"shard_size \(--shard-size\) cannot be combined with --stats",
        ),
        ({"batch_size": 0}, r"batch_size \(--batch-size\) must be at least 1, got 0"),
        ({"dtype": torch.int8}, r"dtype \(--storage-dtype\) must be a floating-point .*got 'int8'"),
        ({"dtype": "float33"}, r"must be a floating-point storage dtype .*got 'float33'"),
        ({"backend": "lens"}, r"unknown capture backend 'lens' \(renamed transformer_lens\)"),
        ({"sites": "resid_mid"}, r"unknown site\(s\) \['resid_mid'\]"),
        ({"layers": "a:b"}, r"bad layer spec 'a:b'"),
        ({"positions": "first"}, r"unknown position 'first'"),
    ],
)
def test_bad_config_values(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CaptureConfig(**fields)


def test_config_normalises_python_values() -> None:
    config = CaptureConfig(
        sites="resid_pre,mlp_out", layers=[0, 2], positions="t_inst,-1", dtype=torch.bfloat16
    )
    assert config.sites == ("resid_pre", "mlp_out")
    assert config.layers == LayerSpec("0,2") and config.positions == PositionSpec("t_inst,-1")
    assert config.dtype == "bfloat16" and config.torch_dtype is torch.bfloat16
    assert CaptureConfig(layers=None).layers == LayerSpec("all")
    docs = field_docs(CaptureConfig)
    assert all(docs.get(f.name) for f in dataclasses.fields(CaptureConfig))
    assert "2:6 (end-exclusive)" in docs["layers"] and "2-5 (inclusive)" in docs["layers"]


@pytest.fixture(scope="module")
def lm(checkpoints: dict[str, Path]):
    return load_model(checkpoints["llama"])


def test_non_float_storage_dtype_is_refused(lm) -> None:
    with pytest.raises(ConfigError, match="must be a floating-point storage dtype"):
        capture(lm, PROMPTS, CaptureConfig(dtype=torch.int8), progress=False)


def test_config_or_fields(lm) -> None:
    config = CaptureConfig(sites=("resid_post",), layers="1", positions="last")
    a = capture(lm, PROMPTS, config, progress=False)
    b = capture(
        lm, PROMPTS, CaptureConfig(sites="resid_post", layers=[1], positions="last"), progress=False
    )
    c = capture(lm, PROMPTS, dataclasses.replace(config, layers="0,1"), progress=False)
    assert torch.equal(a["resid_post"], b["resid_post"])
    assert c.layers == (0, 1) and torch.equal(c["resid_post"][:, 1], a["resid_post"][:, 0])
    assert a.provenance.config == {**b.provenance.config}
    with pytest.raises(TypeError, match="unexpected keyword argument 'layers'"):
        capture(lm, PROMPTS, config, layers="0,1")  # settings live in the config, not keywords
    with pytest.raises(TypeError, match="unexpected keyword argument 'progress'"):
        CaptureConfig(progress=False)  # a keyword of capture(), not a capture setting
    with pytest.raises(ConfigError, match=r"use capture_stats\(\)"):
        capture(lm, PROMPTS, CaptureConfig(stats=True))
    with pytest.raises(ConfigError, match=r"use capture_to_disk\(\)"):
        capture(lm, PROMPTS, CaptureConfig(shard_size=2))


def test_prompt_set_encoded_set_and_strings_agree(lm) -> None:
    prompt_set = load_prompts(PROMPTS)
    encoded = encode_set(lm.tokenizer, prompt_set, chat_template=lm.chat_template)
    kwargs = {"layers": "1", "positions": "t_inst,t_post"}
    from_strings = capture(lm, PROMPTS, CaptureConfig(**kwargs), progress=False)
    from_set = capture(lm, prompt_set, CaptureConfig(**kwargs), progress=False)
    from_encoded = capture(lm, encoded, CaptureConfig(**kwargs), progress=False)
    assert plan_capture(lm, encoded, CaptureConfig(**kwargs)).prompts is encoded  # not re-encoded
    for acts in (from_set, from_encoded):
        assert torch.equal(acts["resid_pre"], from_strings["resid_pre"])
        assert acts.provenance.prompt_sets == from_strings.provenance.prompt_sets
    # Encoded without a system prompt, asked with one: encoded again, with the system prompt.
    with_system = capture(lm, encoded, CaptureConfig(system="Be brief.", **kwargs), progress=False)
    assert with_system["resid_pre"].shape == from_strings["resid_pre"].shape
    assert with_system.provenance["system"] == "Be brief."
    assert not torch.equal(with_system["resid_pre"], from_strings["resid_pre"])


def test_prompt_longer_than_the_model_is_an_error(lm) -> None:
    long = "word " * 400  # the tiny models take 256 positions
    with pytest.raises(SafegeomError, match="takes at most 256 positions"):
        capture(lm, [*PROMPTS, long], progress=False)
    unchecked = encode_set(lm.tokenizer, [long], chat_template=lm.chat_template)
    with pytest.raises(SafegeomError, match="takes at most 256 positions"):
        capture_stats(lm, unchecked, progress=False)


def test_offset_outside_a_prompt_fails_before_any_pass(lm) -> None:
    calls: list[int] = []
    handle = lm.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ConfigError, match="position offset 200 lies outside a prompt of"):
            capture(lm, PROMPTS, CaptureConfig(positions="200"), progress=False)
    finally:
        handle.remove()
    assert calls == []


def test_disk_capture_checks_the_folder_first(lm, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputPathError, match="is a file; give a folder"):
        capture_to_disk(lm, PROMPTS, blocker, progress=False)
    with pytest.raises(ConfigError, match="cannot be combined with --stats"):
        capture_to_disk(lm, PROMPTS, tmp_path / "d", CaptureConfig(stats=True), progress=False)


def test_disk_and_stats_modes_take_either_backend(lm, tmp_path: Path) -> None:
    pytest.importorskip("transformer_lens")
    from safegeom.activations.values import load_activations

    kwargs = {
        "sites": "resid_pre,mlp_out",
        "layers": "0,1",
        "positions": "t_inst,last",
        "dtype": torch.float32,
        "batch_size": 2,
    }
    hooks = capture(lm, PROMPTS, CaptureConfig(**kwargs), progress=False)
    folder = capture_to_disk(
        lm,
        PROMPTS,
        tmp_path / "tl",
        CaptureConfig(backend="transformer_lens", **kwargs),
        progress=False,
    )
    disk = load_activations(folder)
    assert disk.provenance["backend"] == "transformer_lens"
    stats = capture_stats(
        lm,
        PROMPTS,
        CaptureConfig(backend="transformer_lens", stats=True, covariance=True, **kwargs),
        progress=False,
    )
    assert stats.provenance["backend"] == "transformer_lens" and stats.n_forward == 2
    for site in ("resid_pre", "mlp_out"):
        torch.testing.assert_close(disk[site], hooks[site], atol=1e-5, rtol=1e-5)
        mean = hooks[site].double().mean(0)
        torch.testing.assert_close(stats.mean(site), mean, atol=1e-5, rtol=0)


def test_package_face_capture_is_the_capture_function(lm) -> None:
    import safegeom

    assert safegeom.capture is capture
    acts = safegeom.capture(
        lm, PROMPTS, CaptureConfig(layers="1", positions="last"), progress=False
    )
    assert torch.equal(
        acts["resid_pre"],
        capture(lm, PROMPTS, CaptureConfig(layers="1", positions="last"), progress=False)[
            "resid_pre"
        ],
    )
