"""The options every command that takes a ``MODEL`` shares (:class:`LoadConfig`), as the
keyword arguments of :func:`~safegeom.models.loading.load_model`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safegeom.errors import NotFoundError, SafegeomError

__all__ = ["LoadConfig"]


@dataclass(frozen=True)
class LoadConfig:
    """How to load a model: the options every command that takes a ``MODEL`` shares."""

    dtype: str | None = None
    """float32, bfloat16, float16 or auto (default: float32 on CPU, the checkpoint's own elsewhere)."""
    device: str | None = None
    """cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)."""
    device_map: str | None = None
    """Spread the model over devices: auto, balanced, sequential, or JSON (text or a .json file)
    mapping module names to devices ({"model.layers.20": 1}); not with --device."""
    max_memory: str | None = None
    """With --device-map: memory per device as JSON, e.g. '{"0": "20GiB", "cpu": "64GiB"}'."""
    offload_folder: str | None = None
    """With --device-map: folder for the weights the map puts on "disk"."""
    merge_adapter: bool = False
    """Fold a PEFT adapter into its base weights (only for an adapter folder)."""
    allow_pickle: bool = False
    """Allow pickled pytorch_model.bin weights (unsafe: a pickle can run code)."""
    trust_remote_code: bool = False
    """Run modelling code shipped with a checkpoint (off: only transformers' own code runs)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for a hub id."""
    layout: str | None = None
    """Block-layout override for an unknown architecture: JSON text or a .json file."""
    chat_template: str | None = None
    """File with a Jinja chat template to use instead of the tokenizer's own."""

    def keywords(self) -> dict[str, Any]:
        """The keyword arguments of :func:`load_model` this config stands for.

        Raises:
            SafegeomError: ``layout`` is not JSON (text or file), or ``chat_template`` names no
                readable file.
        """
        layout: dict[str, Any] | None = None
        if self.layout is not None:
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
        template: str | None = None
        if self.chat_template is not None:
            path = Path(self.chat_template).expanduser()
            if not path.is_file():
                raise NotFoundError(f"--chat-template: no file at {path}")
            template = path.read_text(encoding="utf-8")
        return {
            "dtype": self.dtype,
            "device": self.device,
            "device_map": self.device_map,
            "max_memory": self.max_memory,
            "offload_folder": self.offload_folder,
            "merge_adapter": self.merge_adapter,
            "allow_pickle": self.allow_pickle,
            "trust_remote_code": self.trust_remote_code,
            "revision": self.revision,
            "layout": layout,
            "chat_template": template,
        }
