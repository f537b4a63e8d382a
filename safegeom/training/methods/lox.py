"""LoX as a training method (docs/methods.md §8): LoRA, each checkpoint extrapolated by LoX.

LoX (Perin et al. 2025): ``W ← W_ft + α U_k U_kᵀ ΔW_align`` with ``ΔW_align = V = W_aligned −
W_unaligned`` and ``U_k`` its top-``k`` left singular vectors
(:func:`~safegeom.training.weight_space.lox_extrapolate`), ``W_ft = W_aligned + s·B A`` the fine-tuned
weight; the checkpoint is a full model folder (the raw adapter is kept for resuming,
:mod:`safegeom.training.posthoc`). The paper applies LoX to the aligned model *before* fine-tuning;
here the same extrapolation is added to every fine-tuned checkpoint (the LoRA update is trained on
the aligned model). At step 0 (``B = 0``) the checkpoint is exactly the paper's LoX model.
``lox.json`` lists the weights extrapolated. Needs the unaligned base (``--unaligned-base``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from safegeom.artifacts import write_json
from safegeom.errors import ConfigError
from safegeom.models import LoadConfig, LoadedModel
from safegeom.training.methods.safe_lora import posthoc_method
from safegeom.training.posthoc import (
    PosthocConfig,
    lora_factors,
    lora_layers,
    oriented,
    state_hash,
    unaligned_weights,
)
from safegeom.training.trainable import Export
from safegeom.training.weight_space import lox_extrapolate

__all__ = ["LOX_FILE", "METHOD", "prepare_lox"]

LOX_FILE = "lox.json"
"""The LoX settings and weights extrapolated, written in each lox checkpoint."""


def _lox_increments(
    lm: LoadedModel,
    names: Mapping[str, bool],
    unaligned: Mapping[str, Tensor],
    k: int,
    alpha: float,
) -> dict[str, Tensor]:
    """``α U_k U_kᵀ ΔW_align`` per block weight whose alignment update is not zero (CPU)."""
    state = lm.base.state_dict()
    out = {}
    for name, before in unaligned.items():
        w = state[name].detach()
        aligned = oriented(w.double(), names[name])
        base = oriented(before.to(w.device).double(), names[name])
        increment = oriented(lox_extrapolate(aligned, base, k, alpha) - aligned, names[name])
        out[name] = increment.to(w.dtype).cpu()
    return out


def _lox_export(increments: Mapping[str, Tensor], record: dict[str, Any]) -> Export:
    def export(peft_model: nn.Module, folder: Path) -> str:
        """Save the fine-tuned model with LoX applied as a full model folder; return its hash."""
        layers = {weight: module for weight, _, module in lora_layers(peft_model)}
        base = peft_model.get_base_model()  # type: ignore[operator]
        state = {
            k.replace(".base_layer.", "."): v
            for k, v in base.state_dict().items()
            if ".lora_" not in k
        }
        for weight in dict.fromkeys([*layers, *increments]):
            w = state[weight]
            shared = [k for k, t in state.items() if k != weight and t.data_ptr() == w.data_ptr()]
            if shared:
                raise ConfigError(
                    f"lox cannot change {weight}: it is tied to {shared[0]}; "
                    "leave it out of --lora-targets"
                )
            new = w.detach().double()
            if weight in layers:
                b, a, s = lora_factors(layers[weight])
                new += oriented(s * (b @ a), bool(getattr(layers[weight], "fan_in_fan_out", 0)))
            if weight in increments:
                new += increments[weight].to(w.device).double()
            state[weight] = new.to(w.dtype).cpu()
        base.save_pretrained(folder, state_dict=state)
        write_json(folder / LOX_FILE, {**record, "weights": list(increments)})
        return state_hash(state)

    return export


def prepare_lox(
    method: str, lm: LoadedModel, config: PosthocConfig, load: LoadConfig | None = None
) -> tuple[dict[str, Any], Export]:
    """Load the unaligned base and build LoX's checkpoint transform (module docstring).

    As :func:`prepare_safe_lora`; the record holds ``lox_rank`` and ``lox_alpha``, and the
    unaligned weights are dropped once the increments are computed.

    Raises:
        ConfigError: as :func:`prepare_safe_lora`.
    """
    with unaligned_weights(method, lm, config, load) as (names, unaligned, record):
        increments = _lox_increments(lm, names, unaligned, config.lox_rank, config.lox_alpha)
    del unaligned
    record |= {"lox_rank": config.lox_rank, "lox_alpha": float(config.lox_alpha)}
    return record, _lox_export(increments, dict(record))


METHOD = posthoc_method(
    "docs/methods.md §8: LoX's extrapolation added to LoRA; needs --unaligned-base", prepare_lox
)
"""LoX."""
