"""Load a causal LM and its tokenizer the same way whatever its family or form.

``MODEL`` may be the embedded ``tiny-chat``, a local directory holding a full checkpoint, a local
PEFT adapter directory (its base comes from ``adapter_config.json``), a RefusalGuard edit folder
(``refusalguard.json`` names its base; the edit is attached as hooks, see ``safegeom.models.reft``),
or a Hugging Face hub id (fetched only when a user names one; nothing in the tests, the demo or CI
downloads).

Offline-first and safe by default: weights load from safetensors unless ``allow_pickle=True``,
and ``trust_remote_code`` is off unless asked for.

A model larger than one device loads with ``device_map`` (``"auto"``, ``"balanced"``, or a map of
module names to devices, see :mod:`safegeom.models.placement`): transformers and accelerate place
its modules, and every hook safegeom attaches runs on the device that holds its layer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from safegeom.errors import ConfigError, ModelLoadError, NotFoundError
from safegeom.execution import twin
from safegeom.models.checkpoint import (
    SourceForm,
    adapter_base_spec,
    check_device,
    check_weight_files,
    resolve_source,
)
from safegeom.models.finite import check_finite_weights
from safegeom.models.hashing import weight_hash
from safegeom.models.layout import ArchLayout, layout_for, resolve
from safegeom.models.load_config import LoadConfig
from safegeom.models.placement import adapter_placement, execution_device, is_split, placement
from safegeom.models.tokenizer_loading import load_tokenizer
from safegeom.models.upstream_warnings import silence_upstream_deprecations
from safegeom.models.vocab import check_embedding

__all__ = ["TINY_CHAT", "LoadConfig", "LoadedModel", "load_model", "tiny_chat_path", "weight_hash"]

TINY_CHAT = "tiny-chat"
"""Name of the embedded safety-aligned model that ships inside the package."""

_ASSETS = Path(__file__).resolve().parent.parent / "assets"


def tiny_chat_path() -> Path:
    """Return the directory of the embedded ``tiny-chat`` checkpoint.

    Raises:
        NotFoundError: the weights are not in this installation (rebuild with ``make tiny-chat``).
    """
    path = _ASSETS / TINY_CHAT
    if not (path / "config.json").is_file():
        raise NotFoundError(
            f"tiny-chat weights are missing from {path}; rebuild them with `make tiny-chat`"
        )
    return path


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM with its tokenizer, its block layout and where it came from.

    The model is in eval mode. ``name`` is what the caller asked for (``tiny-chat``, a path, a hub
    id); ``source`` is the resolved location; ``adapter`` is the PEFT adapter directory, if any.
    """

    model: PreTrainedModel | nn.Module
    tokenizer: Any
    name: str
    source: str
    layout: ArchLayout
    adapter: str | None = None
    merged: bool = False
    chat_template: str | None = field(default=None, repr=False)
    """A chat template the caller supplied, used instead of the tokenizer's own."""
    edit: Any = field(default=None, repr=False)
    """The RefusalGuard edit (``safegeom.models.reft.ReftEdit``) attached to the model, if any;
    ``lm.edit.detach()`` removes it."""

    @property
    def base(self) -> nn.Module:
        """The underlying transformers model (unwrapped from a PEFT wrapper when applied)."""
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if callable(get_base) and self.adapter and not self.merged else self.model

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder blocks, in order."""
        return resolve(self.base, self.layout.blocks)  # type: ignore[return-value]

    @property
    def n_layers(self) -> int:
        """Number of decoder blocks."""
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return int(resolve(self.base, self.layout.embed).weight.shape[-1])

    @property
    def device(self) -> torch.device:
        """The device inputs go to: the input embedding's (execution) device. With a device map
        (:attr:`split`) other modules may compute elsewhere."""
        return execution_device(resolve(self.base, self.layout.embed))

    @property
    def split(self) -> bool:
        """Whether a device map spread the model over several devices or offloaded part of it."""
        return is_split(self.model)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the first floating-point parameter."""
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    @property
    def max_positions(self) -> int | None:
        """The context length (``config.max_position_embeddings``), when the config has one."""
        value = getattr(getattr(self.base, "config", None), "max_position_embeddings", None)
        return int(value) if isinstance(value, int) and value > 0 else None

    @property
    def model_type(self) -> str:
        """``config.model_type`` of the base model."""
        return str(self.base.config.model_type)

    @cached_property
    def weight_hash(self) -> str:
        """A sha256 of the weights (see :func:`weight_hash`), computed once on first use.

        With a RefusalGuard edit attached, the hash covers the edit too (it differs from the base's).
        """
        digest = weight_hash(self.model)
        if self.edit is None:
            return digest
        prefix = "fp:" if digest.startswith("fp:") else ""
        return (
            prefix + hashlib.sha256(f"{digest}|edit:{self.edit.weight_hash()}".encode()).hexdigest()
        )


def _default_device() -> str:
    """This process's device: CUDA when available, else the CPU; with the sharded twins installed
    under a launcher (:mod:`safegeom.execution`), this rank's (``cuda:LOCAL_RANK``)."""
    here = twin("device")
    if here is not None:
        return str(here())
    return "cuda" if torch.cuda.is_available() else "cpu"


def _parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype | str:
    if dtype is None:
        return torch.float32 if device == "cpu" else "auto"
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    resolved = getattr(torch, aliases.get(dtype, dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ConfigError(
            f"unknown dtype {dtype!r} (--dtype); use float32, bfloat16, float16 or auto"
        )
    return resolved


def _resolve_source(spec: str | Path, revision: str | None = None) -> tuple[SourceForm, str]:
    """Return ``(form, location)`` (see ``resolve_source``)."""
    text = str(spec)
    if text == TINY_CHAT:
        return "full", str(tiny_chat_path())
    return resolve_source(text, TINY_CHAT, _ASSETS / TINY_CHAT, revision)


def _adapter_base(adapter: Path, revision: str | None, override: str | Path | None) -> str:
    """The location of an adapter's base: ``override`` when given, else the base its
    ``adapter_config.json`` names.

    Raises:
        ModelLoadError: the file is not JSON or names no base.
        NotFoundError: the base is neither a local folder nor a reachable hub id.
    """
    if override is not None:
        return _resolve_source(override, revision)[1]
    base_spec = adapter_base_spec(adapter)
    try:
        return _resolve_source(base_spec, revision)[1]
    except NotFoundError as err:
        raise NotFoundError(
            f"{adapter / 'adapter_config.json'} names the base model {base_spec!r} "
            f"(base_model_name_or_path), which cannot be found: {err}; pass "
            "LoadConfig(adapter_base=...) (safegeom audit: --base), put the base model there "
            "or edit that field"
        ) from None


def load_model(spec: str | Path = TINY_CHAT, config: LoadConfig = LoadConfig()) -> LoadedModel:
    """Load a model and tokenizer, ready for capture, interventions and evaluation.

    Args:
        spec: ``tiny-chat``, a local checkpoint or PEFT adapter directory, or a hub id.
        config: how to load it (:class:`LoadConfig`; what ``--dtype``, ``--device`` ... give on
            the command line). ``dtype``: default float32 on CPU, the checkpoint's own dtype
            elsewhere. ``device``: default CUDA when available, else CPU. ``device_map`` spreads
            the model over this machine's devices instead (not with ``device``):
            ``"auto"``/``"balanced"``/``"balanced_low_0"``/``"sequential"`` (transformers fills
            the GPUs, then CPU, then disk), or ``{module name: device}`` (``0``, ``"cuda:1"``,
            ``"cpu"``, ``"disk"``), as a dict, JSON text or a ``.json`` file; hooks (capture,
            interventions) run on the device holding their layer, inputs go to the embedding's
            device (:attr:`LoadedModel.device`); refused under a launcher (one model per
            process). ``max_memory`` and ``offload_folder`` go with ``device_map``.
            ``merge_adapter`` folds an adapter into its base weights; ``adapter_base`` loads an
            adapter onto another base than the one its ``adapter_config.json`` names.

    Returns:
        A :class:`LoadedModel` in eval mode, tokenizer padded on the left.

    Example:
        >>> lm = load_model("tiny-chat", LoadConfig(dtype="float64", device="cpu"))
        >>> lm.dtype, lm.model.training
        (torch.float64, False)
    """
    silence_upstream_deprecations()  # peft's is_gradient_checkpointing, past_key_values
    layout, chat_template = config.layout_override(), config.template_text()
    revision, device, merge_adapter = config.revision, config.device, config.merge_adapter
    form, location = _resolve_source(spec, revision)
    placed = placement(
        config.device_map,
        config.max_memory,
        config.offload_folder,
        device,
        edit=form == "refusalguard",
    )
    if form == "refusalguard":  # the base it names, with the edit attached as hooks
        from safegeom.models.reft import load_edited

        return load_edited(spec, Path(location), load_model, config)
    if placed:
        device_str = "cuda" if torch.cuda.is_available() else "cpu"  # for the default dtype only
    else:
        device_str = check_device(str(device) if device is not None else _default_device())
    dtype = config.dtype
    torch_dtype = _parse_dtype(dtype if not isinstance(dtype, str) else dtype.lower(), device_str)
    if config.adapter_base is not None and form != "adapter":
        raise ConfigError(
            f"adapter_base is the base a PEFT adapter is loaded onto, but {spec} is not an "
            "adapter folder (no adapter_config.json); drop LoadConfig.adapter_base"
        )
    if merge_adapter and form != "adapter":
        raise ConfigError(
            f"--merge-adapter (merge_adapter=True) folds a PEFT adapter into its base, but {spec} "
            "is a full checkpoint (no adapter_config.json); drop the flag"
        )
    common: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
    if revision is not None:
        common["revision"] = revision

    adapter_dir: str | None = None
    base_location = location
    if form == "adapter":
        adapter_dir = location
        base_location = _adapter_base(Path(location), revision, config.adapter_base)
    allow_pickle = config.allow_pickle
    if form != "hub":
        check_weight_files(base_location, allow_pickle)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base_location, dtype=torch_dtype, use_safetensors=not allow_pickle, **common, **placed
        )
    except (OSError, ValueError) as err:
        if not (isinstance(err, OSError) or placed):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelLoadError(f"cannot load the model at {base_location}: {first}") from None
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir, **adapter_placement(model, placed))
        if merge_adapter:
            model = model.merge_and_unload()
    if not placed:
        model.to(device_str)
    model.eval()

    tok_location = adapter_dir if adapter_dir and _has_tokenizer(adapter_dir) else base_location
    tokenizer = load_tokenizer(tok_location, common)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    base = model.get_base_model() if adapter_dir and not merge_adapter else model
    check_embedding(base, len(tokenizer), str(spec))
    check_finite_weights(model, str(spec))
    arch = layout_for(base.config.model_type, layout)
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=str(spec),
        source=location,
        layout=arch,
        adapter=adapter_dir,
        merged=bool(adapter_dir and merge_adapter),
        chat_template=chat_template,
    )
    resolve(loaded.base, arch.blocks)  # fail early on a wrong override
    return loaded


def _has_tokenizer(directory: str) -> bool:
    return any((Path(directory) / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))
