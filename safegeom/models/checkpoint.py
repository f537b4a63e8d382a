"""Where a ``MODEL`` spec points, and the checks that make a bad one fail in one clear line.

``resolve_source`` looks for a local folder first and only then asks the hub, once and with a
short timeout, so an unknown name fails in about a second instead of a minute of retries. The
weight files of a local checkpoint are checked before transformers reads them: a truncated or
random-bytes ``model.safetensors`` and a checkpoint holding only pickled weights each get their
own message. ``check_device`` refuses a device this torch build cannot use.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Literal

import torch

from safegeom.errors import ConfigError, ModelLoadError, NotFoundError
from safegeom.models.smollm2 import SMOL_CHAT, SMOLLM2, smol_chat_path, smollm2_path

__all__ = [
    "SourceForm",
    "adapter_base_spec",
    "check_device",
    "check_weight_files",
    "hub_is_cached",
    "resolve_source",
    "safetensors_problem",
]

_HUB_TIMEOUT_S = 10.0


def _looks_local(text: str, path: Path) -> bool:
    return text.startswith((".", "/", "~")) or bool(path.suffix) or text.count("/") > 1


SourceForm = Literal["full", "adapter", "refusalguard", "hub"]
"""The form a model spec takes on disk or on the hub: a ``full`` checkpoint folder, a PEFT
``adapter`` folder, a ``refusalguard`` edit folder, or a ``hub`` id (the form decides how it loads)."""


def resolve_source(
    spec: str, tiny_chat: str, tiny_chat_dir: Path, revision: str | None
) -> tuple[SourceForm, str]:
    """Return ``(form, location)`` for ``spec`` (:data:`SourceForm`): ``full``, ``adapter``,
    ``refusalguard`` or ``hub``.

    A folder with ``refusalguard.json`` is a RefusalGuard edit (its JSON names the base model).

    Raises:
        NotFoundError: ``spec`` is neither a local checkpoint folder nor a reachable hub id.
        ModelLoadError: ``spec`` is a folder without ``config.json`` or ``adapter_config.json``.
    """
    if spec == tiny_chat:
        return "full", str(tiny_chat_dir)
    if spec == SMOLLM2:
        return "full", str(smollm2_path())
    if spec == SMOL_CHAT:
        return "adapter", str(smol_chat_path())
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "refusalguard.json").is_file():
            return "refusalguard", str(path)
        if (path / "adapter_config.json").is_file():
            return "adapter", str(path)
        if (path / "config.json").is_file():
            return "full", str(path)
        raise ModelLoadError(
            f"{path} is not a model checkpoint: it has neither config.json nor adapter_config.json "
            "(nor refusalguard.json)"
        )
    if path.exists() or _looks_local(spec, path):
        raise NotFoundError(
            f"no model directory at {spec}; pass tiny-chat, a directory or a hub id"
        )
    reason = _hub_problem(spec, revision)
    if reason:
        raise NotFoundError(
            f"{spec!r} is not a local folder, and not reachable as a hub id ({reason}); "
            "pass tiny-chat, a checkpoint folder, or a hub id with network access"
        )
    return "hub", spec


def adapter_base_spec(adapter: str | Path) -> str:
    """The base model a PEFT adapter folder names: ``base_model_name_or_path`` of its
    ``adapter_config.json``, as written (a path on the machine that trained it, or a hub id).

    Raises:
        ModelLoadError: the file cannot be read as a JSON object, or names no base.
    """
    file = Path(adapter) / "adapter_config.json"
    try:
        base = json.loads(file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise ModelLoadError(f"{file} is not a readable JSON object") from None
    if not base:
        raise ModelLoadError(
            f"{file} names no base_model_name_or_path; give the base model (safegeom audit "
            "--base, load_model(spec, LoadConfig(adapter_base=...)))"
        )
    return str(base)


def hub_is_cached(repo: str, revision: str | None) -> bool:
    """Whether the hub cache already holds ``repo``'s ``config.json`` (so no network is needed)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return False
    try:
        hit = try_to_load_from_cache(repo, "config.json", revision=revision)
    except Exception:  # an id the hub would reject (bad characters, too many parts)
        return False
    return isinstance(hit, str)


def _hub_problem(repo: str, revision: str | None) -> str | None:
    """Why ``repo`` cannot be used as a hub id, or ``None`` when it can (cached or reachable)."""
    if hub_is_cached(repo, revision):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set and it is not in the local hub cache"
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(repo, revision=revision, timeout=_HUB_TIMEOUT_S)
    except Exception as err:  # network down, unknown repo, gated, malformed id: all one answer
        first = str(err).strip().splitlines()
        return f"{type(err).__name__}: {first[0] if first else 'no detail'}"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file, or ``None`` when its header adds up."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            (n_header,) = struct.unpack("<Q", raw)
            if n_header > size - 8:
                return "its header length points past the end of the file"
            header = json.loads(handle.read(n_header).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = [
        int(v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
    ]
    expected = 8 + n_header + max(ends, default=0)
    if expected > size:
        return f"truncated: the header describes {expected} bytes, the file has {size}"
    return None


def check_weight_files(location: str, allow_pickle: bool) -> None:
    """Check the weight files of a local checkpoint folder before transformers reads them.

    Raises:
        ModelLoadError: a ``.safetensors`` file is truncated or not safetensors, or the folder
            holds only pickled ``.bin`` weights and ``allow_pickle`` is off.
    """
    folder = Path(location)
    if not folder.is_dir():
        return
    tensors = sorted(folder.glob("*.safetensors"))
    for path in tensors:
        problem = safetensors_problem(path)
        if problem:
            raise ModelLoadError(
                f"{path} is not a readable safetensors file ({problem}); "
                "re-download or re-save the checkpoint"
            )
    pickled = sorted(p.name for p in folder.glob("*.bin") if "model" in p.name)
    if not tensors and pickled and not allow_pickle:
        raise ModelLoadError(
            f"{folder} holds only pickled weights ({', '.join(pickled)}), which can run code when "
            "loaded; pass --allow-pickle (allow_pickle=True) if you trust this checkpoint"
        )
    if not tensors and not pickled and not any(folder.glob("*.index.json")):
        raise ModelLoadError(f"{folder} has a config.json but no weight files (*.safetensors)")


def check_device(device: str) -> str:
    """Return ``device`` when this torch build can use it.

    Raises:
        ConfigError: ``device`` is not a device name, or names CUDA/MPS that is not available.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = (
                "this torch build has no CUDA"
                if torch.version.cuda is None
                else "no GPU is visible"
            )
            raise ConfigError(f"--device {device}: {build}; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: MPS is not available here; use --device cpu")
    return device
