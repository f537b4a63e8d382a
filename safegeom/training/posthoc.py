"""What Safe LoRA and LoX share as methods (docs/methods.md §8): the unaligned base, LoRA layers.

Both are training-free and need the unaligned base (``--unaligned-base``) beside the aligned
model being fine-tuned. The run trains plain LoRA; each checkpoint saves the transformed model
(what ``load_model`` reads) and the raw adapter in ``raw_adapter/`` (what ``--resume`` reads), so
resuming stays bit-for-bit. The transform works on copies: the adapter being trained is never
changed, so the training itself is exactly that of ``lora`` with the same settings.

Both transforms act on the linear projections of the decoder blocks (attention and MLP), where
``V = W_aligned − W_unaligned`` is taken from the two models' weights, in float64 (the transforms
are in :mod:`safegeom.training.methods.safe_lora` and :mod:`safegeom.training.methods.lox`). Here:
their settings (:class:`PosthocConfig`), the unaligned weights that differ from the aligned ones
(:func:`unaligned_weights`), and the LoRA layers and factors of the model being trained.

Memory: the unaligned model is loaded on the CPU and dropped once read; what is kept is one
block-weights' worth of tensors (the unaligned weights for Safe LoRA, the LoX increments
``α U_k U_kᵀ ΔW_align`` in the model's dtype for LoX), on the CPU. Every product is computed in
float64, one weight at a time, on the model's device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from safegeom.config import check
from safegeom.errors import ConfigError, SafegeomError
from safegeom.models import LoadConfig, LoadedModel, load_model, weight_hash
from safegeom.models.layout import resolve
from safegeom.training.trainable import base_spec

__all__ = [
    "ADAPTER",
    "PosthocConfig",
    "block_linears",
    "lora_factors",
    "lora_layers",
    "oriented",
    "state_hash",
    "unaligned_weights",
]

ADAPTER = "default"
"""The PEFT adapter name of the LoRA being trained."""
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class PosthocConfig:
    """Settings of the ``safe-lora`` and ``lox`` methods (``safegeom train safe-lora|lox``)."""

    unaligned_base: str | None = None
    """The unaligned base model the aligned MODEL was trained from (required by safe-lora, lox)."""
    safe_lora_threshold: float = 0.5
    """Safe LoRA's τ in [0, 1]: a layer's update is projected when its cosine similarity to the
    projection is below τ (safe-lora only)."""
    lox_rank: int = 6
    """LoX's k ≥ 1: top singular directions of each weight's alignment update extrapolated
    (lox only)."""
    lox_alpha: float = 1.25
    """LoX's α ≥ 0: how far each weight moves along its top-k alignment update (lox only)."""

    def __post_init__(self) -> None:
        """Check every range.

        Raises:
            ConfigError: a value out of range; the message names the field and its flag.
        """
        base = self.unaligned_base
        check(
            base is None or (isinstance(base, str) and base.strip() != ""),
            "unaligned_base",
            "must name a model (a local folder or a hub id)",
            base,
        )
        tau = self.safe_lora_threshold
        check(
            isinstance(tau, (int, float)) and math.isfinite(tau) and 0.0 <= tau <= 1.0,
            "safe_lora_threshold",
            "must be a number in [0, 1]",
            tau,
        )
        k = self.lox_rank
        check(
            isinstance(k, int) and not isinstance(k, bool) and k >= 1,
            "lox_rank",
            "must be an integer ≥ 1",
            k,
        )
        alpha = self.lox_alpha
        check(
            isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0,
            "lox_alpha",
            "must be a finite number ≥ 0",
            alpha,
        )


class _Weights:
    """A state dict that :func:`~safegeom.models.weight_hash` hashes like a model's."""

    def __init__(self, state: Mapping[str, Tensor]) -> None:
        self._state = state

    def state_dict(self) -> Mapping[str, Tensor]:
        """The tensors by name, as given."""
        return self._state


def state_hash(state: Mapping[str, Tensor]) -> str:
    """The weight hash of a state dict, as :func:`~safegeom.models.weight_hash` of a model."""
    return weight_hash(_Weights(state))  # type: ignore[arg-type]


def block_linears(lm: LoadedModel) -> dict[str, bool]:
    """The weight names of every linear projection in the decoder blocks of ``lm``.

    Returns:
        ``{name: transposed}``: ``model.layers.0.self_attn.q_proj.weight`` → ``False``;
        ``True`` for GPT-2 ``Conv1D`` weights, stored ``[in, out]``.
    """
    names: dict[str, bool] = {}
    for i, block in enumerate(resolve(lm.base, lm.layout.blocks)):  # type: ignore[arg-type]
        for sub, module in block.named_modules():
            if isinstance(module, (nn.Linear, Conv1D)):
                names[f"{lm.layout.blocks}.{i}.{sub}.weight"] = isinstance(module, Conv1D)
    if not names:
        raise ConfigError(f"no linear projections found in the {lm.model_type} blocks")
    return names


def oriented(w: Tensor, transposed: bool) -> Tensor:
    """``w`` as ``[out, in]``: transposed for a GPT-2 ``Conv1D`` weight (stored ``[in, out]``)."""
    return w.T if transposed else w


def _load_unaligned(
    spec: str, lm: LoadedModel, names: Mapping[str, bool], load: LoadConfig | None
) -> tuple[dict[str, Tensor], str]:
    """The unaligned weights that differ from the aligned ones (CPU), and the model's hash.

    Raises:
        ConfigError: the unaligned base does not have the aligned model's block weights, or
            equals it in every block weight.
    """
    is_adapter = (Path(spec).expanduser() / "adapter_config.json").is_file()
    config = dataclasses.replace(
        load or LoadConfig(), merge_adapter=is_adapter, device="cpu", dtype=lm.dtype
    )
    try:
        other = load_model(spec, config)
    except SafegeomError as err:  # name the option the model came from
        raise type(err)(f"--unaligned-base {spec}: {err}") from None
    if other.edit is not None:
        raise ConfigError(f"--unaligned-base {spec} is a RefusalGuard checkpoint; pass its base")
    mine, theirs = lm.base.state_dict(), other.base.state_dict()
    problems = []
    if other.n_layers != lm.n_layers:
        problems.append(f"it has {other.n_layers} blocks, MODEL has {lm.n_layers}")
    for name in names:
        if name not in theirs:
            problems.append(f"it has no weight {name}")
        elif theirs[name].shape != mine[name].shape:
            problems.append(
                f"{name} is {tuple(theirs[name].shape)} there and "
                f"{tuple(mine[name].shape)} in MODEL"
            )
    if problems:
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise ConfigError(
            f"--unaligned-base {spec} does not have the architecture of MODEL: "
            f"{'; '.join(problems[:2])}{more}; pass the model the aligned one was trained from"
        )
    digest = other.weight_hash
    weights = {n: theirs[n].detach() for n in names if not torch.equal(theirs[n], mine[n].cpu())}
    if not weights:
        raise ConfigError(
            f"--unaligned-base {spec} has the same weights as MODEL in every block projection, so "
            "there is no alignment update; pass the model the aligned one was trained from"
        )
    return weights, digest


def lora_layers(peft_model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(weight name, module name, module)`` of every LoRA layer of a PEFT model.

    Raises:
        ConfigError: the adapter has parameters other than plain LoRA ``A``/``B`` matrices
            (LoRA on embeddings, DoRA, LoRA biases), or no LoRA layer.
    """
    found: list[tuple[str, str, nn.Module]] = []
    handled: set[str] = set()
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and ADAPTER in lora_a:
            weight = name.removeprefix(_PEFT_PREFIX) + ".weight"
            found.append((weight, name, module))
            handled |= {f"{name}.lora_{x}.{ADAPTER}.weight" for x in "AB"}
    extra = [k for k in peft_model.state_dict() if ".lora_" in k and k not in handled]
    if extra:
        raise ConfigError(
            f"safe-lora and lox transform plain LoRA on linear layers; the adapter also has "
            f"{extra[0]} (LoRA on embeddings, DoRA or a LoRA bias); drop it from the settings"
        )
    if not found:
        raise ConfigError("the model has no LoRA layer; safe-lora and lox transform a LoRA run")
    return found


def lora_factors(module: nn.Module) -> tuple[Tensor, Tensor, float]:
    """``(B, A, s)`` of a LoRA layer in float64: its update is ``s·B A`` (``[out, in]``)."""
    b = module.lora_B[ADAPTER].weight.detach().double()  # type: ignore[index]
    a = module.lora_A[ADAPTER].weight.detach().double()  # type: ignore[index]
    return b, a, float(module.scaling[ADAPTER])  # type: ignore[index]


@contextmanager
def unaligned_weights(
    method: str, lm: LoadedModel, config: PosthocConfig, load: LoadConfig | None
) -> Iterator[tuple[dict[str, bool], dict[str, Tensor], dict[str, Any]]]:
    """Within the block: the block weights' names, the unaligned weights that differ from
    ``lm``'s and the record's first keys; the RNG states are left as they were.

    Raises:
        ConfigError: no ``unaligned_base`` (names ``--unaligned-base``); an unaligned base of
            another architecture or shape, or equal to ``lm``.
    """
    if config.unaligned_base is None:
        raise ConfigError(
            f"{method} needs --unaligned-base MODEL: the unaligned model the aligned one was "
            "trained from (V = W_aligned − W_unaligned is what it keeps safe)"
        )
    names = block_linears(lm)
    device = lm.device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        unaligned, digest = _load_unaligned(config.unaligned_base, lm, names, load)
        record: dict[str, Any] = {
            "method": method,
            "unaligned_base": base_spec(config.unaligned_base),
            "unaligned_hash": digest,
            "n_aligned_weights": len(unaligned),
        }
        yield names, unaligned, record
