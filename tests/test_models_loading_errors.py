"""Loading failures are one line that names the fix (issue 10, item 7)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from safegeom.errors import ConfigError, ModelLoadError, NotFoundError, SafegeomError
from safegeom.models import LoadConfig, load_model


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unknown_name_fails_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(
        NotFoundError,
        match=r"'no-such-model' is not a local folder, and not "
        r"reachable as a hub id \(HF_HUB_OFFLINE",
    ):
        load_model("no-such-model")
    with pytest.raises(NotFoundError, match="not a local folder, and not reachable as a hub id"):
        load_model("someone/no-such-model")
    assert time.monotonic() - start < 5


def test_unreachable_hub_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def unreachable(self: object, repo: str, **kwargs: object) -> None:
        raise ConnectionError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(NotFoundError, match=r"not reachable as a hub id \(ConnectionError: Name"):
        load_model("someone/no-such-model")


def test_truncated_and_random_safetensors(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    cut = _copy(checkpoints["llama"], tmp_path / "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ModelLoadError,
        match=r"model.safetensors is not a readable safetensors "
        r"file \(truncated: .*re-download or re-save",
    ):
        load_model(cut)
    noise = _copy(checkpoints["llama"], tmp_path / "noise")
    (noise / "model.safetensors").write_bytes(
        torch.randint(0, 255, (4096,)).byte().numpy().tobytes()
    )
    with pytest.raises(ModelLoadError, match="is not a readable safetensors file"):
        load_model(noise)


def test_device_cuda_without_cuda(checkpoints: dict[str, Path]) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match=r"--device cuda: .*use --device cpu"):
        load_model(checkpoints["llama"], LoadConfig(device="cuda"))
    with pytest.raises(ConfigError, match=r"--device 'gpu7' is not a device"):
        load_model(checkpoints["llama"], LoadConfig(device="gpu7"))


def test_merge_adapter_on_full_model_is_an_error(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"--merge-adapter .* is a full checkpoint"):
        load_model(checkpoints["llama"], LoadConfig(merge_adapter=True))


def test_load_settings_are_no_keywords(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'device'"):
        load_model(checkpoints["llama"], device="cpu")  # LoadConfig(device="cpu")
    with pytest.raises(TypeError, match="unexpected keyword argument 'dtype'"):
        load_model(checkpoints["llama"], LoadConfig(), dtype="float32")


def test_adapter_with_missing_base(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base = load_model(checkpoints["qwen2"])
    peft_model = get_peft_model(base.model, LoraConfig(r=2, target_modules=["v_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone" / "base")
    config_file.write_text(json.dumps(config))
    with pytest.raises(
        NotFoundError,
        match=r"adapter_config.json names the base model "
        r"'.*gone/base' \(base_model_name_or_path\), which cannot be found",
    ):
        load_model(tmp_path / "adapter")


def test_layout_bad_json() -> None:
    with pytest.raises(SafegeomError, match=r"--layout is not JSON \(Expecting .* at char"):
        LoadConfig(layout="{blocks: model.layers").layout_override()
    with pytest.raises(SafegeomError, match="--layout must be a JSON object"):
        LoadConfig(layout="[1, 2]").layout_override()


def test_folder_without_weights(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    empty = _copy(checkpoints["llama"], tmp_path / "empty")
    (empty / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"has a config.json but no weight files"):
        load_model(empty)
