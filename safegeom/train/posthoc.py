"""Safe LoRA and LoX as training methods (docs/methods.md §8): LoRA, transformed per checkpoint.

Both are training-free and need the unaligned base (``--unaligned-base``) beside the aligned
model being fine-tuned. The run trains plain LoRA; each checkpoint saves the transformed model
(what ``load_model`` reads) and the raw adapter in ``raw_adapter/`` (what ``--resume`` reads), so
resuming stays bit-for-bit. The transform works on copies: the adapter being trained is never
changed, so the training itself is exactly that of ``lora`` with the same settings.

Both transforms act on the linear projections of the decoder blocks (attention and MLP), where
``V = W_aligned − W_unaligned`` is taken from the two models' weights, in float64:

- ``safe-lora`` (Hsu et al. 2024): per LoRA layer, ``ΔW = s·B A`` is replaced by ``C ΔW`` with
  ``C = V Vᵀ/‖V‖_F`` when their cosine similarity is below τ (``--safe-lora-threshold``), i.e.
  ``B ← C B``, so the checkpoint stays a rank-r PEFT adapter folder. ``C B`` is computed as
  ``V (Vᵀ B)/‖V‖_F`` (never the ``out × out`` matrix); it equals
  :func:`~safegeom.train.baselines.safe_lora_project`. A layer where ``V = 0`` (alignment did
  not change it) has no alignment subspace: its update is kept. The decisions are written to
  ``safe_lora.json`` in each checkpoint.
- ``lox`` (Perin et al. 2025): ``W ← W_ft + α U_k U_kᵀ ΔW_align`` with ``ΔW_align = V`` and
  ``U_k`` its top-``k`` left singular vectors (:func:`~safegeom.train.baselines.lox_extrapolate`),
  ``W_ft = W_aligned + s·B A`` the fine-tuned weight; the checkpoint is a full model folder. The
  paper applies LoX to the aligned model *before* fine-tuning; here the same extrapolation is
  added to every fine-tuned checkpoint (the LoRA update is trained on the aligned model). At
  step 0 (``B = 0``) the checkpoint is exactly the paper's LoX model. ``lox.json`` lists the
  weights extrapolated.

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

from safegeom.artifacts import write_json
from safegeom.config import check
from safegeom.errors import ConfigError
from safegeom.models import LoadConfig, LoadedModel, load_model, weight_hash
from safegeom.models.layout import resolve
from safegeom.train.baselines import lox_extrapolate
from safegeom.train.wrap import Export, base_spec

__all__ = [
    "LOX_FILE",
    "SAFE_LORA_FILE",
    "PosthocConfig",
    "block_linears",
    "prepare_lox",
    "prepare_safe_lora",
]

SAFE_LORA_FILE = "safe_lora.json"
"""Per-layer Safe LoRA decisions, written in each safe-lora checkpoint."""
LOX_FILE = "lox.json"
"""The LoX settings and weights extrapolated, written in each lox checkpoint."""
_ADAPTER = "default"
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


def _hash(state: Mapping[str, Tensor]) -> str:
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


def _oriented(w: Tensor, transposed: bool) -> Tensor:
    return w.T if transposed else w


def _load_unaligned(
    spec: str, lm: LoadedModel, names: Mapping[str, bool], load: LoadConfig | None
) -> tuple[dict[str, Tensor], str]:
    """The unaligned weights that differ from the aligned ones (CPU), and the model's hash.

    Raises:
        ConfigError: the unaligned base does not have the aligned model's block weights, or
            equals it in every block weight.
    """
    config = dataclasses.replace(load or LoadConfig(), merge_adapter=False)
    is_adapter = (Path(spec).expanduser() / "adapter_config.json").is_file()
    other = load_model(spec, config, device="cpu", dtype=lm.dtype, merge_adapter=is_adapter)
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


def _lora_layers(peft_model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(weight name, module name, module)`` of every LoRA layer of a PEFT model.

    Raises:
        ConfigError: the adapter has parameters other than plain LoRA ``A``/``B`` matrices
            (LoRA on embeddings, DoRA, LoRA biases), or no LoRA layer.
    """
    found: list[tuple[str, str, nn.Module]] = []
    handled: set[str] = set()
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and _ADAPTER in lora_a:
            weight = name.removeprefix(_PEFT_PREFIX) + ".weight"
            found.append((weight, name, module))
            handled |= {f"{name}.lora_{x}.{_ADAPTER}.weight" for x in "AB"}
    extra = [k for k in peft_model.state_dict() if ".lora_" in k and k not in handled]
    if extra:
        raise ConfigError(
            f"safe-lora and lox transform plain LoRA on linear layers; the adapter also has "
            f"{extra[0]} (LoRA on embeddings, DoRA or a LoRA bias); drop it from the settings"
        )
    if not found:
        raise ConfigError("the model has no LoRA layer; safe-lora and lox transform a LoRA run")
    return found


def _factors(module: nn.Module) -> tuple[Tensor, Tensor, float]:
    """``(B, A, s)`` of a LoRA layer in float64: its update is ``s·B A`` (``[out, in]``)."""
    b = module.lora_B[_ADAPTER].weight.detach().double()  # type: ignore[index]
    a = module.lora_A[_ADAPTER].weight.detach().double()  # type: ignore[index]
    return b, a, float(module.scaling[_ADAPTER])  # type: ignore[index]


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
    v = _oriented(aligned.detach().double() - unaligned.to(aligned.device).double(), transposed)
    norm = float(torch.linalg.matrix_norm(v))
    b, a, s = _factors(module)
    cb = v @ (v.T @ b) / norm
    similarity = _cosine(s * (b @ a), s * (cb @ a))
    dtype = module.lora_B[_ADAPTER].weight.dtype  # type: ignore[index]
    return (cb.to(dtype) if similarity < tau else None), similarity, norm


def _safe_lora_export(
    names: Mapping[str, bool], unaligned: Mapping[str, Tensor], tau: float, record: dict[str, Any]
) -> Export:
    def export(peft_model: nn.Module, folder: Path) -> str:
        """Save the Safe-LoRA-projected adapter in ``folder``; return its weight hash."""
        state = dict(peft_model.state_dict())
        layers = []
        for weight, name, module in _lora_layers(peft_model):
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
                state[f"{name}.lora_B.{_ADAPTER}.weight"] = new_b
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
        return _hash(state)

    return export


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
        aligned = _oriented(w.double(), names[name])
        base = _oriented(before.to(w.device).double(), names[name])
        increment = _oriented(lox_extrapolate(aligned, base, k, alpha) - aligned, names[name])
        out[name] = increment.to(w.dtype).cpu()
    return out


def _lox_export(increments: Mapping[str, Tensor], record: dict[str, Any]) -> Export:
    def export(peft_model: nn.Module, folder: Path) -> str:
        """Save the fine-tuned model with LoX applied as a full model folder; return its hash."""
        layers = {weight: module for weight, _, module in _lora_layers(peft_model)}
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
                b, a, s = _factors(layers[weight])
                new += _oriented(s * (b @ a), bool(getattr(layers[weight], "fan_in_fan_out", 0)))
            if weight in increments:
                new += increments[weight].to(w.device).double()
            state[weight] = new.to(w.dtype).cpu()
        base.save_pretrained(folder, state_dict=state)
        write_json(folder / LOX_FILE, {**record, "weights": list(increments)})
        return _hash(state)

    return export


@contextmanager
def _unaligned(
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
        τ), and the function :class:`~safegeom.train.wrap.Trainable` calls as
        ``export(peft_model, folder)`` at each checkpoint; it returns the hash of the model
        ``load_model(folder)`` reads.

    Raises:
        ConfigError: no ``unaligned_base`` (names ``--unaligned-base``); an unaligned base of
            another architecture or shape, or equal to ``lm``.
    """
    with _unaligned(method, lm, config, load) as (names, unaligned, record):
        tau = float(config.safe_lora_threshold)
        record["safe_lora_threshold"] = tau
        return record, _safe_lora_export(names, unaligned, tau, dict(record))


def prepare_lox(
    method: str, lm: LoadedModel, config: PosthocConfig, load: LoadConfig | None = None
) -> tuple[dict[str, Any], Export]:
    """Load the unaligned base and build LoX's checkpoint transform (module docstring).

    As :func:`prepare_safe_lora`; the record holds ``lox_rank`` and ``lox_alpha``, and the
    unaligned weights are dropped once the increments are computed.

    Raises:
        ConfigError: as :func:`prepare_safe_lora`.
    """
    with _unaligned(method, lm, config, load) as (names, unaligned, record):
        increments = _lox_increments(lm, names, unaligned, config.lox_rank, config.lox_alpha)
    del unaligned
    record |= {"lox_rank": config.lox_rank, "lox_alpha": float(config.lox_alpha)}
    return record, _lox_export(increments, dict(record))
