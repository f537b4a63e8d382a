"""How to load a model (:class:`LoadConfig`): the one settings value of
:func:`~safegeom.models.loading.load_model`, and the options every command that takes a ``MODEL``
shares."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from safegeom.errors import NotFoundError, SafegeomError
from safegeom.models.layout import ArchLayout

__all__ = ["LoadConfig"]

_JINJA = ("{{", "{%")
"""What every Jinja template holds and no file name does: how a template's text is told from a
file that holds one."""


@dataclass(frozen=True)
class LoadConfig:
    """How to load a model: the options every command that takes a ``MODEL`` shares.

    On the command line every field is text; in Python ``dtype`` and ``device`` may be torch
    values (kept as their names, so the config stays JSON-ready), ``device_map`` and
    ``max_memory`` dicts, ``layout`` an :class:`~safegeom.models.layout.ArchLayout` or a dict.

    Example:
        >>> config = LoadConfig(dtype=torch.float64, device=torch.device("cpu"))
        >>> config.dtype, config.device
        ('float64', 'cpu')
    """

    dtype: str | torch.dtype | None = None
    """float32, bfloat16, float16 or auto (default: float32 on CPU, the checkpoint's own elsewhere)."""
    device: str | torch.device | None = None
    """cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)."""
    device_map: str | dict[str, int | str] | None = None
    """Spread the model over devices: auto, balanced, sequential, or JSON (text or a .json file)
    mapping module names to devices ({"model.layers.20": 1}); not with --device."""
    max_memory: str | dict[int | str, int | str] | None = None
    """With --device-map: memory per device as JSON, e.g. '{"0": "20GiB", "cpu": "64GiB"}'."""
    offload_folder: str | Path | None = None
    """With --device-map: folder for the weights the map puts on "disk"."""
    merge_adapter: bool = False
    """Fold a PEFT adapter into its base weights (only for an adapter folder)."""
    allow_pickle: bool = False
    """Allow pickled pytorch_model.bin weights (unsafe: a pickle can run code)."""
    trust_remote_code: bool = False
    """Run modelling code shipped with a checkpoint (off: only transformers' own code runs)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for a hub id."""
    layout: str | ArchLayout | dict[str, Any] | None = None
    """Block-layout override for an unknown architecture: JSON text or a .json file."""
    chat_template: str | None = None
    """File with a Jinja chat template to use instead of the tokenizer's own (in Python also the
    template's text)."""
    adapter_base: str | Path | None = field(default=None, metadata={"cli": False})
    """For a PEFT adapter folder, the base to load it onto instead of the one its
    adapter_config.json names (Python only: safegeom audit sets it from --base)."""

    def __post_init__(self) -> None:
        """Keep torch dtypes and devices as their names."""
        if isinstance(self.dtype, torch.dtype):
            object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))
        if isinstance(self.device, torch.device):
            object.__setattr__(self, "device", str(self.device))

    def layout_override(self) -> ArchLayout | dict[str, Any] | None:
        """The block layout ``layout`` names (parsed from JSON text or a .json file), if any.

        Raises:
            SafegeomError: ``layout`` is text but not a JSON object (inline or in a file).
        """
        if not isinstance(self.layout, str):
            return self.layout
        text = self.layout
        if text.strip().endswith(".json") and Path(text).expanduser().is_file():
            text = Path(text).expanduser().read_text(encoding="utf-8")
        try:
            layout = json.loads(text)
        except json.JSONDecodeError as err:
            raise SafegeomError(
                f"--layout is not JSON ({err.msg} at char {err.pos}); give a JSON object "
                'such as \'{"blocks": "model.layers"}\' or a .json file'
            ) from None
        if not isinstance(layout, dict):
            raise SafegeomError("--layout must be a JSON object of layout fields")
        return layout

    def template_text(self) -> str | None:
        """The Jinja chat template ``chat_template`` gives: its text, or the file's content.

        Raises:
            NotFoundError: ``chat_template`` is neither a template (no ``{{``/``{%``) nor a file.
        """
        if self.chat_template is None or any(mark in self.chat_template for mark in _JINJA):
            return self.chat_template
        path = Path(self.chat_template).expanduser()
        if not path.is_file():
            raise NotFoundError(f"--chat-template: no file at {path}")
        return path.read_text(encoding="utf-8")
