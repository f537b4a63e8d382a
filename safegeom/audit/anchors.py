"""Multi-anchor references: further aligned models the audit's geometry is read against.

An anchor (``AuditConfig.anchors``, ``safegeom audit RUN --anchor NAME=MODEL``) is a model whose
carriers are extracted exactly as the base's are (:func:`~safegeom.audit.reference.build_reference`:
r₀ selected on it, h₀, B₀ and the per-layer fits from the audit's carrier prompts). Every
checkpoint's geometry rows are then computed once against the base's :class:`Reference` (anchor
``base``) and once against each anchor's, from the same captured activations, so an anchor's rows
are the rows an audit with that anchor as its base would write (docs/methods.md §5).

An anchor must be readable in the trajectory's terms: the same hidden size (its carriers live in
the same space), the same tokenizer (the carrier prompts are the same tokens) and the same chat
template (the positions ``t_inst`` and ``t_post`` are the same tokens). A model that differs is
refused in one line before anything is measured (:func:`check_anchors`).

On disk: ``DIR/anchors/NAME/``, a saved :class:`Reference` (loaded back on a rerun).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from safegeom.attacks.attack_set import tokenizer_hash
from safegeom.audit.config import AuditConfig
from safegeom.audit.reference import Reference, build_reference, load_reference
from safegeom.errors import ConfigError
from safegeom.models.chat import template_hash
from safegeom.models.loading import LoadConfig, LoadedModel, load_model

__all__ = ["FOLDER", "anchor_references", "check_anchor", "check_anchors"]

FOLDER = "anchors"
"""The audit folder's subfolder holding one saved reference per anchor."""


def check_anchor(name: str, anchor: LoadedModel, base: LoadedModel) -> None:
    """Refuse an anchor the trajectory's carriers cannot be compared with.

    Raises:
        ConfigError: its hidden size, tokenizer or chat template differs from the base's; the
            message names the anchor, the difference and the fix.
    """
    what = f"--anchor {name}={anchor.name}"
    fix = "pass an aligned model of the base's architecture and tokenizer"
    if anchor.d_model != base.d_model:
        raise ConfigError(
            f"{what}: hidden size {anchor.d_model}, the base {base.name} has {base.d_model}; {fix}"
        )
    if tokenizer_hash(anchor.tokenizer) != tokenizer_hash(base.tokenizer):
        raise ConfigError(f"{what}: its tokenizer is not the base {base.name}'s; {fix}")
    if template_hash(anchor.tokenizer, anchor.chat_template) != template_hash(
        base.tokenizer, base.chat_template
    ):
        raise ConfigError(
            f"{what}: its chat template is not the base {base.name}'s; {fix} (or --chat-template)"
        )


def _pending(out: Path, config: AuditConfig) -> dict[str, str]:
    """The anchors whose reference is not saved in ``out`` yet: name → model."""
    saved = out / FOLDER
    return {n: m for n, m in config.anchor_models.items() if not (saved / n).is_dir()}


def check_anchors(out: Path, config: AuditConfig, load: LoadConfig, base: LoadedModel) -> None:
    """Load every anchor whose reference is not saved in ``out`` yet and check it against the
    base (:func:`check_anchor`), one at a time, before anything is measured.

    Raises:
        ConfigError: an anchor that differs from the base (the first one found).
        SafegeomError: an anchor that cannot be loaded (the loader's message).
    """
    for name, model in _pending(out, config).items():
        check_anchor(name, load_model(model, load), base)


def anchor_references(
    out: Path,
    config: AuditConfig,
    load: LoadConfig,
    *,
    progress: bool,
    isolated: Callable[[], AbstractContextManager[object]],
) -> dict[str, Reference]:
    """Every anchor's :class:`Reference`: loaded back from ``out/anchors/NAME``, or built from the
    anchor (as the base's is) and saved there atomically.

    ``isolated`` is the context manager the build runs in (the runner's ``alone``).

    Returns:
        Anchor name → reference, in the order of ``config.anchors``.
    """
    references: dict[str, Reference] = {}
    pending = _pending(out, config)
    for name, model in config.anchor_models.items():
        folder = out / FOLDER / name
        if name not in pending:
            references[name] = load_reference(folder)
            continue
        with isolated():
            reference = build_reference(load_model(model, load), config, progress=progress)
        tmp = out / FOLDER / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        reference.save(tmp)
        os.replace(tmp, folder)
        references[name] = reference
    return references
