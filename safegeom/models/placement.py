"""Where a model's modules live when a device map spreads them over several devices.

``load_model(..., LoadConfig(device_map=...))`` hands the map to transformers, which places each module on a
device and, where the map names more than one device (or ``"disk"``), attaches accelerate's
``AlignDevicesHook`` to move inputs (and offloaded weights) to each module's *execution device* at
forward time. The rest of safegeom asks only three questions, answered here:

- :func:`execution_device`: the device a module computes on (its hook's execution device, else the
  device of its own weights);
- :func:`input_device`: where token ids must go (the input embedding's execution device);
- :func:`is_split`: whether the model was dispatched over several devices or offloaded.

:func:`parse_device_map` and :func:`parse_max_memory` turn what a user gives (``"auto"``, a JSON
file, a dict) into what ``from_pretrained`` takes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safegeom.errors import ConfigError, NotFoundError
from safegeom.execution import twin

__all__ = [
    "DEVICE_MAP_STRATEGIES",
    "execution_device",
    "input_device",
    "is_split",
    "offloaded_tensor",
    "parse_device_map",
    "parse_max_memory",
    "placement",
]

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""The device-map strategies transformers computes itself (accelerate's ``infer_auto_device_map``)."""


def _json_object(value: str, flag: str, example: str) -> dict[str, Any]:
    """A JSON object from text or from a ``.json`` file."""
    text = value
    if value.strip().endswith(".json"):
        path = Path(value).expanduser()
        if not path.is_file():
            raise NotFoundError(f"{flag}: no file at {path}")
        text = path.read_text(encoding="utf-8")
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{flag} {value!r} is neither a strategy nor JSON ({err.msg} at char {err.pos}); "
            f"give {example}"
        ) from None
    if not isinstance(parsed, dict) or not parsed:
        raise ConfigError(f"{flag} must be a non-empty JSON object, such as {example}")
    return parsed


def _device_value(value: Any, key: str) -> int | str:
    """One device of a map: a GPU ordinal, ``cpu``, ``disk``, ``meta`` or a torch device name."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(
            f"--device-map: module {key!r} maps to {value!r}; use a GPU index, cpu, disk or cuda:N"
        )
    if isinstance(value, int) or value in ("disk", "meta"):
        return value
    if value.isdigit():
        return int(value)
    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"--device-map: module {key!r} maps to {value!r}, not a device; use a GPU index, "
            "cpu, disk or cuda:N"
        ) from None
    return value


def parse_device_map(value: str | Mapping[str, Any] | None) -> str | dict[str, int | str] | None:
    """What ``from_pretrained(device_map=...)`` takes, from a strategy, JSON text, a JSON file or a
    mapping of module names (``model.layers.3``) to devices (``0``, ``"cuda:1"``, ``"cpu"``,
    ``"disk"``).

    Returns:
        ``None``, a strategy name (:data:`DEVICE_MAP_STRATEGIES`) or a ``{module: device}`` dict.

    Raises:
        ConfigError: not a strategy, not a JSON object, or a value that is not a device.
        NotFoundError: a ``.json`` path that names no file.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if value in DEVICE_MAP_STRATEGIES:
            return value
        example = f"{', '.join(DEVICE_MAP_STRATEGIES)}, a .json file or '{{\"model.layers.0\": 0}}'"
        value = _json_object(value, "--device-map", example)
    if not isinstance(value, Mapping) or not value:
        raise ConfigError("--device-map must be a strategy or a non-empty {module: device} map")
    return {str(k): _device_value(v, str(k)) for k, v in value.items()}


def parse_max_memory(value: str | Mapping[Any, Any] | None) -> dict[int | str, int | str] | None:
    """What ``from_pretrained(max_memory=...)`` takes: ``{0: "20GiB", "cpu": "64GiB"}``, from a
    mapping, JSON text or a JSON file (string keys that are digits become GPU ordinals).

    Returns:
        ``None`` or a ``{device: size}`` dict (sizes as ``"20GiB"`` strings or bytes).

    Raises:
        ConfigError: not a JSON object, or a size that is neither a string nor a whole number.
    """
    if value is None:
        return None
    if isinstance(value, str):
        value = _json_object(value, "--max-memory", '\'{"0": "20GiB", "cpu": "64GiB"}\'')
    out: dict[int | str, int | str] = {}
    for key, size in value.items():
        if isinstance(size, bool) or not isinstance(size, (int, str)):
            raise ConfigError(f"--max-memory: {key!r} has size {size!r}; use '20GiB' or bytes")
        out[int(key) if str(key).isdigit() else str(key)] = size
    return out


def adapter_placement(model: nn.Module, placed: Mapping[str, Any]) -> dict[str, Any]:
    """What ``PeftModel.from_pretrained`` needs to keep a base placed by a device map where it is.

    With ``cpu`` in the map, peft dispatches the wrapped model again (with ``auto`` by default,
    which would move the CPU-offloaded weights to the GPUs): it gets the map the base was
    dispatched with, under the wrapper's module names, and the offload folder.

    Returns:
        Keyword arguments (``{}`` for a model placed on one device).

    Raises:
        ConfigError: the map offloads weights to disk. peft (0.21) then writes a copy of the
            base's weights file, with the adapter in it, at the file's absolute path taken as
            relative to the working directory (from ``/`` it would overwrite the base itself).
    """
    if not placed:
        return {}
    resolved = getattr(model, "hf_device_map", None) or {}
    on_disk = sorted(k for k, v in resolved.items() if v == "disk")
    if on_disk:
        raise ConfigError(
            f"a PEFT adapter on a base with weights offloaded to disk ({on_disk[0]!r} and "
            f"{len(on_disk) - 1} more) is refused: peft writes the offloaded weights again, "
            "relative to the working directory. Leave disk out of the map (more --max-memory "
            "for GPUs and CPU), or merge the adapter into a full checkpoint first"
        )
    out: dict[str, Any] = {
        "device_map": {f"base_model.model.{k}".rstrip("."): v for k, v in resolved.items()}
    }
    if placed.get("offload_folder"):
        out["offload_folder"] = placed["offload_folder"]
    return out


def _hooks(module: nn.Module) -> list[Any]:
    """The accelerate hooks on a module (a ``SequentialHook`` holds several)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's execution device, else the device
    of its first parameter or buffer that is not on ``meta`` (CPU for a module without any)."""
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where token ids go: the execution device of the input embedding (``get_input_embeddings``),
    else of the model itself."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    return execution_device(embedding if isinstance(embedding, nn.Module) else model)


def is_split(model: nn.Module) -> bool:
    """Whether a device map dispatched ``model`` over several devices or offloaded part of it
    (``hf_device_map`` with more than one value, or ``"disk"``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device_map = getattr(base, "hf_device_map", None)
    if not isinstance(device_map, dict):
        return False
    values = {str(v) for v in device_map.values()}
    return len(values) > 1 or "disk" in values


def offloaded_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (entry ``name`` of ``model.state_dict()``), or its stored value when a device
    map offloaded it (a ``meta`` placeholder whose weights accelerate keeps in the weights map of
    the module's hook, or of a module above it).

    Raises:
        ConfigError: a ``meta`` tensor with no stored value (the weights were never loaded).
    """
    if tensor.device.type != "meta":
        return tensor
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):  # the owner first, then each module above it
        prefix, local = ".".join(parts[:cut]), ".".join(parts[cut:])
        try:
            module = model.get_submodule(prefix) if prefix else model
        except AttributeError:
            continue
        for hook in _hooks(module):
            weights = getattr(hook, "weights_map", None)
            if weights is None:
                continue
            try:
                return weights[local]
            except KeyError:
                continue
    raise ConfigError(f"{name} is on the meta device and no offloaded copy of it exists")


def _check_gpu(value: int | str, key: str) -> None:
    """Refuse a map entry naming a GPU that is not visible."""
    device = torch.device(f"cuda:{value}" if isinstance(value, int) else value)
    if device.type != "cuda":
        return
    count = torch.cuda.device_count()
    if count == 0 or (device.index is not None and device.index >= count):
        raise ConfigError(
            f"--device-map: module {key!r} maps to {device}, but {count} GPU(s) are visible"
        )


def placement(
    device_map: str | Mapping[str, Any] | None,
    max_memory: str | Mapping[Any, Any] | None,
    offload_folder: str | Path | None,
    device: str | torch.device | None,
    *,
    edit: bool = False,
) -> dict[str, Any]:
    """The ``from_pretrained`` keywords that place a model by a device map (``{}`` without one).

    Raises:
        ConfigError: ``device`` given as well; ``max_memory`` or ``offload_folder`` without a map;
            a map under a launcher (several processes) or for a RefusalGuard edit (``edit``); a
            GPU the machine does not have; a malformed map (see :func:`parse_device_map`).
    """
    parsed = parse_device_map(device_map)
    if parsed is None:
        if max_memory is not None or offload_folder is not None:
            raise ConfigError("--max-memory and --offload-folder only apply with --device-map")
        return {}
    if device is not None:
        raise ConfigError(
            f"--device-map {device_map!r} and --device {str(device)!r} both given: a device map "
            "places every module itself; drop one of them"
        )
    if (refuse := twin("device_map")) is not None:  # under a launcher, with the twins installed
        refuse(device_map)
    if edit:
        raise ConfigError(
            "a RefusalGuard edit folder runs its edit on one device: load it without --device-map"
        )
    if isinstance(parsed, dict):
        for key, value in parsed.items():
            if value not in ("disk", "meta"):
                _check_gpu(value, key)
    out: dict[str, Any] = {"device_map": parsed}
    if max_memory is not None:
        out["max_memory"] = parse_max_memory(max_memory)
    if offload_folder is not None:
        out["offload_folder"] = str(Path(offload_folder).expanduser())
    return out
