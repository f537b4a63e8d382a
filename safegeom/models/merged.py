"""Models shipped as a PEFT adapter, and their adapter merged into the base as a plain checkpoint.

``safegeom train`` trains a LoRA (or a ReFT edit) on a plain model only: a LoRA checkpoint names
its base, and an adapter as a base would load unmerged. :func:`is_adapter_spec` tells such a spec
(``smol-chat``, or any folder with ``adapter_config.json``); :func:`save_merged` writes its
merged copy, the MODEL such a run trains from.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safegeom.models.smollm2 import SMOL_CHAT

__all__ = ["is_adapter_spec", "save_merged"]


def is_adapter_spec(spec: str | os.PathLike[str]) -> bool:
    """Whether the MODEL ``spec`` is a PEFT adapter: the shipped ``smol-chat``, or a folder
    holding ``adapter_config.json``. Hub ids are not asked (``False``)."""
    text = str(spec)
    return text == SMOL_CHAT or (Path(text).expanduser() / "adapter_config.json").is_file()


def save_merged(spec: str | os.PathLike[str], folder: str | os.PathLike[str]) -> Path:
    """Merge the adapter ``spec`` into its base and save the result as a checkpoint ``folder``.

    Written into ``folder.tmp`` beside it, then renamed into place, so a ``folder`` that exists is
    complete; one already there (from an earlier call, with whatever spec) is replaced.

    Returns:
        ``folder`` (absolute), loadable with ``load_model`` and trainable with ``train``.

    Raises:
        ConfigError: ``spec`` is not an adapter (see :func:`is_adapter_spec`).
    """
    from safegeom.errors import ConfigError
    from safegeom.models.load_config import LoadConfig
    from safegeom.models.loading import load_model

    if not is_adapter_spec(spec):
        raise ConfigError(f"{spec} is not a PEFT adapter: there is nothing to merge")
    target = Path(folder).expanduser().resolve()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged = load_model(str(spec), LoadConfig(merge_adapter=True, device="cpu"))
    merged.model.save_pretrained(tmp)
    merged.tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target
