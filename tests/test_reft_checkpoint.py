"""A RefusalGuard checkpoint: save → load_model(folder) is the edited model, bad ones fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from safegeom.artifacts import read_safetensors, save_safetensors
from safegeom.errors import ArtifactError, ModelLoadError, NotFoundError
from safegeom.models import load_model
from safegeom.models.checkpoint import resolve_source
from safegeom.models.reft import CONFIG_FILE, TENSOR_FILE, ReftConfig, ReftEdit, load_reft
from tests.model_helpers import prompt_logits
from tests.tiny_models import build_checkpoint

PROMPTS = ["Write a tutorial on how to make a cake.", "Hi.", "How do I kill a Python process?"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("reft_ckpt"), "llama")


def _logits(lm, prompts=PROMPTS) -> torch.Tensor:
    return prompt_logits(lm, prompts)


def _trained(lm, layers=(0, 2), site="resid_pre") -> ReftEdit:
    g = torch.Generator().manual_seed(3)
    bases = {x: torch.linalg.qr(torch.randn(lm.d_model, 2, generator=g))[0] for x in layers}
    edit = ReftEdit.for_model(lm, ReftConfig(layers=layers, rank=3, site=site), bases, seed=5)
    with torch.no_grad():
        for module in edit.edits.values():
            module.free.add_(0.3 * torch.randn(module.free.shape, generator=g))
            module.weight.add_(0.5 * torch.randn(module.weight.shape, generator=g))
            module.bias.add_(torch.randn(module.bias.shape, generator=g))
    return edit


@pytest.mark.parametrize("site", ["resid_pre", "resid_post"])
def test_load_model_on_the_folder_gives_the_edited_model(tmp_path: Path, site: str) -> None:
    base = load_model("tiny-chat")
    edit = _trained(base, site=site)
    with edit.on(base):
        at_save = _logits(base)
        edit.save(tmp_path / "step_10", base="tiny-chat")
    base_logits = _logits(base)
    assert not torch.allclose(at_save, base_logits, atol=1e-3)
    assert resolve_source(str(tmp_path / "step_10"), "tiny-chat", Path("."), None)[0] == (
        "refusalguard"
    )
    lm = load_model(tmp_path / "step_10")
    assert torch.equal(_logits(lm), at_save)
    assert isinstance(lm.edit, ReftEdit) and lm.edit.base == "tiny-chat"
    assert lm.name == str(tmp_path / "step_10") and lm.source == str(tmp_path / "step_10")
    assert lm.weight_hash != base.weight_hash
    lm.edit.detach()
    assert torch.equal(_logits(lm), base_logits)
    info = json.loads((tmp_path / "step_10" / CONFIG_FILE).read_text())
    assert info["d_model"] == 256 and info["layers"] == [0, 2] and info["config"]["site"] == site
    assert info["cone_dims"] == {"0": 2, "2": 2} and info["provenance"]["model"] == "tiny-chat"


def test_load_reft_round_trips_every_tensor(tmp_path: Path, llama: Path) -> None:
    lm = load_model(llama)
    edit = _trained(lm, layers=(1,))
    edit.save(tmp_path / "ck", base=str(llama))
    again = load_reft(tmp_path / "ck")
    assert again.config == edit.config and again.base == str(llama)
    assert again.weight_hash() == edit.weight_hash()
    for name, tensor in edit.tensors().items():
        assert torch.equal(again.tensors()[name], tensor), name


def test_a_relative_base_is_found_next_to_the_folder(tmp_path: Path, llama: Path) -> None:
    lm = load_model(llama)
    edit = _trained(lm, layers=(1,))
    with edit.on(lm):
        expected = _logits(lm)
    (tmp_path / "model").symlink_to(llama, target_is_directory=True)
    edit.save(tmp_path / "run" / "step_0", base="../../model")
    assert torch.equal(_logits(load_model(tmp_path / "run" / "step_0")), expected)


def test_a_base_of_another_hidden_size_fails(tmp_path: Path, llama: Path) -> None:
    edit = _trained(load_model("tiny-chat"), layers=(1,))
    edit.save(tmp_path / "ck", base=str(llama))
    with pytest.raises(ModelLoadError, match="built for hidden size 256, the model has 32"):
        load_model(tmp_path / "ck")


def test_a_missing_base_fails_naming_the_field(tmp_path: Path, llama: Path) -> None:
    edit = _trained(load_model(llama), layers=(1,))
    edit.save(tmp_path / "ck", base=str(tmp_path / "gone"))
    with pytest.raises(NotFoundError, match=r"names the base model .* \(field 'base'\)"):
        load_model(tmp_path / "ck")


def test_damaged_checkpoints_fail_clearly(tmp_path: Path, llama: Path) -> None:
    edit = _trained(load_model(llama), layers=(1,))
    folder = edit.save(tmp_path / "ck", base=str(llama))
    tensors, meta = read_safetensors(folder / TENSOR_FILE)
    tensors["layer.1.rotation"] = tensors["layer.1.rotation"].flip(0)
    save_safetensors(folder / TENSOR_FILE, tensors, meta)
    with pytest.raises(ArtifactError, match="R does not match its stored rotation"):
        load_model(folder)
    del tensors["layer.1.free"]
    save_safetensors(folder / TENSOR_FILE, tensors, meta)
    with pytest.raises(ArtifactError, match="not a consistent RefusalGuard checkpoint"):
        load_reft(folder)
    (folder / TENSOR_FILE).write_bytes(b"junk")
    with pytest.raises(ArtifactError, match="truncated or not safetensors"):
        load_model(folder)
    (folder / CONFIG_FILE).write_text('{"format": "other"}')
    with pytest.raises(ArtifactError, match="is not a RefusalGuard checkpoint"):
        load_model(folder)
