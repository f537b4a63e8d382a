"""Safe LoRA as a training method (docs/methods.md §8): LoRA, each checkpoint projected.

Safe LoRA (Hsu et al. 2024): per LoRA layer, ``ΔW = s·B A`` is replaced by ``C ΔW`` with
``C = V Vᵀ/‖V‖_F`` (``V = W_aligned − W_unaligned``) when their cosine similarity is below τ
(``--safe-lora-threshold``), i.e. ``B ← C B``, so the checkpoint stays a rank-r PEFT adapter
folder. ``C B`` is computed as ``V (Vᵀ B)/‖V‖_F`` (never the ``out × out`` matrix); it equals
:func:`~safegeom.training.weight_space.safe_lora_project`. A layer where ``V = 0`` (alignment did not
change it) has no alignment subspace: its update is kept. The decisions are written to
``safe_lora.json`` in each checkpoint; the raw adapter is kept for resuming
(:mod:`safegeom.training.posthoc`). Needs the unaligned base (``--unaligned-base``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from safegeom.artifacts import write_json
from safegeom.errors import ConfigError
from safegeom.models import LoadConfig, LoadedModel
from safegeom.training.methods.base import Method, Prepared, Setup, fixed
from safegeom.training.posthoc import (
    ADAPTER,
    PosthocConfig,
    lora_factors,
    lora_layers,
    oriented,
    state_hash,
    unaligned_weights,
)
from safegeom.training.trainable import Export

__all__ = [
    "METHOD",
    "SAFE_LORA_FILE",
    "needs_unaligned_base",
    "posthoc_method",
    "prepare_safe_lora",
]

SAFE_LORA_FILE = "safe_lora.json"
"""Per-layer Safe LoRA decisions, written in each safe-lora checkpoint."""


def _cosine(x: Tensor, y: Tensor) -> float:
    """Frobenius cosine; 1 for a zero ``x`` (nothing to project), 0 for a zero ``y`` only."""
    nx, ny = float(torch.linalg.matrix_norm(x)), float(torch.linalg.matrix_norm(y))
    if nx == 0.0:
        return 1.0
    return 0.0 if ny == 0.0 else float((x * y).sum()) / (nx * ny)


def _safe_lora_layer(
    module: nn.Module, aligned: Tensor, unaligned: Tensor | None, transposed: bool, tau: float
) -> tuple[Tensor | None, float | None, float]:
    """Safe LoRA on one layer: ``(C B or None when kept, similarity, ‖V‖_F)``.

    ``similarity`` is ``None`` where ``V = 0`` (no alignment subspace: the update is kept).
    """
    if unaligned is None:
        return None, None, 0.0
    v = oriented(aligned.detach().double() - unaligned.to(aligned.device).double(), transposed)
    norm = float(torch.linalg.matrix_norm(v))
    b, a, s = lora_factors(module)
    cb = v @ (v.T @ b) / norm
    similarity = _cosine(s * (b @ a), s * (cb @ a))
    dtype = module.lora_B[ADAPTER].weight.dtype  # type: ignore[index]
    return (cb.to(dtype) if similarity < tau else None), similarity, norm


def _safe_lora_export(
    names: Mapping[str, bool], unaligned: Mapping[str, Tensor], tau: float, record: dict[str, Any]
) -> Export:
    def export(peft_model: nn.Module, folder: Path) -> str:
        """Save the Safe-LoRA-projected adapter in ``folder``; return its weight hash."""
        state = dict(peft_model.state_dict())
        layers = []
        for weight, name, module in lora_layers(peft_model):
            if weight not in names:
                raise ConfigError(
                    f"safe-lora projects the linear layers of the decoder blocks; LoRA on "
                    f"{weight} has no alignment update there; leave it out of --lora-targets"
                )
            aligned = module.base_layer.weight  # type: ignore[union-attr]
            new_b, similarity, norm = _safe_lora_layer(
                module, aligned, unaligned.get(weight), names[weight], tau
            )
            if new_b is not None:
                state[f"{name}.lora_B.{ADAPTER}.weight"] = new_b
            layers.append(
                {
                    "weight": weight,
                    "similarity": similarity,
                    "projected": new_b is not None,
                    "alignment_norm": norm,
                }
            )
        adapter_state = {k: v for k, v in state.items() if ".lora_" in k}
        peft_model.save_pretrained(  # type: ignore[operator]
            folder, state_dict=adapter_state, save_embedding_layers=False
        )
        n = sum(layer["projected"] for layer in layers)
        write_json(folder / SAFE_LORA_FILE, {**record, "n_projected": n, "layers": layers})
        return state_hash(state)

    return export


def prepare_safe_lora(
    method: str, lm: LoadedModel, config: PosthocConfig, load: LoadConfig | None = None
) -> tuple[dict[str, Any], Export]:
    """Load the unaligned base and build Safe LoRA's checkpoint transform (module docstring).

    Runs once per run on the aligned ``lm`` before LoRA is attached, without touching the RNG
    states (so LoRA's initialisation is that of a ``lora`` run). ``method`` is the name the
    record gives; ``load`` says how to load the unaligned base (it goes on the CPU, in ``lm``'s
    dtype).

    Returns:
        ``(record, export)``: the JSON-able record kept in the manifest (``config["defence"]``:
        method, unaligned base spec and weight hash, number of block weights alignment changed,
        τ), and the function :class:`~safegeom.training.trainable.Trainable` calls as
        ``export(peft_model, folder)`` at each checkpoint; it returns the hash of the model
        ``load_model(folder)`` reads.

    Raises:
        ConfigError: no ``unaligned_base`` (names ``--unaligned-base``); an unaligned base of
            another architecture or shape, or equal to ``lm``.
    """
    with unaligned_weights(method, lm, config, load) as (names, unaligned, record):
        tau = float(config.safe_lora_threshold)
        record["safe_lora_threshold"] = tau
        return record, _safe_lora_export(names, unaligned, tau, dict(record))


def needs_unaligned_base(settings: PosthocConfig, method: str) -> None:
    """Refuse settings without the unaligned base, before any work.

    Raises:
        ConfigError: ``unaligned_base`` is not set (the message names ``--unaligned-base``).
    """
    if settings.unaligned_base is None:
        raise ConfigError(
            f"{method} needs --unaligned-base: the unaligned model MODEL was aligned from "
            "(docs/methods.md §8 transforms the update with W_aligned − W_unaligned)"
        )


def posthoc_method(summary: str, build: Callable[..., tuple[dict[str, Any], Export]]) -> Method:
    """A LoRA method whose every checkpoint goes through a transform against the unaligned base.

    Args:
        summary: the method's help line.
        build: ``build(method, lm, settings, load) -> (record, export)``, e.g.
            :func:`prepare_safe_lora`; it loads the unaligned base and makes the transform.

    Returns:
        The :class:`Method` (LoRA updates, :class:`PosthocConfig` settings, needs
        ``--unaligned-base``).
    """

    def prepare(setup: Setup, settings: PosthocConfig) -> Prepared:
        record, export = build(setup.method, setup.lm, settings, setup.load)
        return Prepared("lora", record, export)

    return Method(
        summary=summary,
        update=fixed("lora"),
        prepare=prepare,
        config=PosthocConfig,
        group="weight-space baselines",
        check=needs_unaligned_base,
    )


METHOD = posthoc_method(
    "docs/methods.md §8: Safe LoRA's projection of LoRA; needs --unaligned-base", prepare_safe_lora
)
"""Safe LoRA."""
