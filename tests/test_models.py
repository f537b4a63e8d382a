"""Loading, the architecture table, and bad-input messages."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from safegeom.errors import ModelLoadError
from safegeom.models import LAYOUTS, ArchLayout, LoadConfig, load_model, weight_hash
from safegeom.models.layout import UnknownArchitectureError, layout_for, resolve
from tests.tiny_models import ARCHS

REQUIRED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox")


def test_table_covers_required_families() -> None:
    assert set(REQUIRED) <= set(LAYOUTS)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_layout_paths_exist(checkpoints: dict[str, Path], arch: str) -> None:
    lm = load_model(checkpoints[arch])
    assert lm.model_type == arch
    assert lm.n_layers == 3 and lm.d_model == 32
    block = lm.blocks[0]
    for path in (lm.layout.attn, lm.layout.mlp, lm.layout.o_proj, lm.layout.down_proj):
        resolve(block, path)
    resolve(lm.model, lm.layout.embed)
    resolve(lm.model, lm.layout.final_norm)
    assert lm.tokenizer.padding_side == "left"
    assert not lm.model.training


def test_dtype_and_device(checkpoints: dict[str, Path]) -> None:
    lm = load_model(checkpoints["llama"], LoadConfig(dtype="bf16", device="cpu"))
    assert lm.dtype == torch.bfloat16 and lm.device.type == "cpu"
    with pytest.raises(ValueError, match="unknown dtype 'float7'"):
        load_model(checkpoints["llama"], LoadConfig(dtype="float7"))


def test_unknown_architecture_names_override(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(
        UnknownArchitectureError,
        match=r"pass LoadConfig\(layout=ArchLayout\(\.\.\.\)\) to load_model",
    ):
        layout_for("mamba_like")
    # The override makes an unknown type usable.
    lm = load_model(checkpoints["llama"], LoadConfig(layout=dict(vars(LAYOUTS["llama"]))))
    assert isinstance(lm.layout, ArchLayout)
    with pytest.raises(ValueError, match=r"module path 'model\.blocks' does not exist"):
        load_model(
            checkpoints["llama"],
            LoadConfig(layout={**vars(LAYOUTS["llama"]), "blocks": "model.blocks"}),
        )
    with pytest.raises(ValueError, match="unknown layout keys"):
        ArchLayout.from_dict({"blocks": "x", "wrong": 1})


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a model checkpoint"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match=r"no model directory at \./nope"):
        load_model("./nope")


def test_safetensors_only_by_default(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    # A checkpoint with only pickled weights needs the explicit flag.
    lm = load_model(checkpoints["gpt2"])
    dst = tmp_path / "pickled"
    dst.mkdir()
    lm.model.config.save_pretrained(dst)
    lm.tokenizer.save_pretrained(dst)
    torch.save(lm.model.state_dict(), dst / "pytorch_model.bin")
    with pytest.raises(
        ModelLoadError, match=r"only pickled weights \(pytorch_model.bin\).*--allow-pickle"
    ):
        load_model(dst)
    assert load_model(dst, LoadConfig(allow_pickle=True)).n_layers == 3


def test_weight_hash_is_stable_and_sensitive(checkpoints: dict[str, Path]) -> None:
    a = load_model(checkpoints["llama"])
    b = load_model(checkpoints["llama"])
    assert a.weight_hash == b.weight_hash == weight_hash(a.model)
    with torch.no_grad():
        next(b.model.parameters()).view(-1)[0] += 1e-3
    assert weight_hash(b.model) != a.weight_hash


def test_peft_adapter_dir(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base = load_model(checkpoints["llama"])
    peft_model = get_peft_model(
        base.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(checkpoints["llama"])
    applied = load_model(tmp_path / "adapter")
    merged = load_model(tmp_path / "adapter", LoadConfig(merge_adapter=True))
    assert applied.adapter and not applied.merged and merged.merged
    assert applied.n_layers == merged.n_layers == 3
    ids = torch.tensor([[1, 5, 9, 12, 30]])
    with torch.no_grad():
        la = applied.model(input_ids=ids).logits
        lb = merged.model(input_ids=ids).logits
        lc = load_model(checkpoints["llama"]).model(input_ids=ids).logits
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    assert (la - lc).abs().max() > 1e-3  # the adapter changes the model
    # an explicit False switches off a True (a keyword merge once kept the True)
    switched_off = dataclasses.replace(LoadConfig(merge_adapter=True), merge_adapter=False)
    unmerged = load_model(tmp_path / "adapter", switched_off)
    assert unmerged.adapter and not unmerged.merged
    with pytest.raises(TypeError, match="unexpected keyword argument 'merge_adapter'"):
        load_model(tmp_path / "adapter", merge_adapter=False)  # settings live in LoadConfig
