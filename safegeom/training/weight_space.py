"""Weight-space safety baselines (docs/methods.md §8): Safe LoRA's projection, LoX's extrapolation.

Both need the *unaligned* base model besides the aligned one: the alignment update
``V = W_aligned − W_unaligned`` of each weight matrix is what they keep safe.

- Safe LoRA (Hsu et al. 2024, "Safe LoRA: the Silver Lining of Reducing Safety Risks when
  Fine-tuning Large Language Models"): per layer the "alignment matrix" ``C = V Vᵀ / ‖V‖_F``;
  a LoRA update ``ΔW = B A`` whose cosine similarity to its projection ``C ΔW`` is below a
  threshold τ is replaced by ``C ΔW``, the others are kept. Training-free, applied after LoRA.
- LoX (Perin et al. 2025, "LoX: Low-Rank Extrapolation Robustifies LLM Safety Against
  Fine-tuning"): ``W ← W_align + α U_k U_kᵀ ΔW_align`` with ``ΔW_align = W_align − W_base`` and
  ``U_k`` its top-``k`` left singular vectors; training-free, applied before fine-tuning.

Every function computes in float64 and returns the input's dtype. A missing unaligned base is a
:class:`~safegeom.errors.ConfigError` naming ``--unaligned-base``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from safegeom.config import check
from safegeom.errors import ConfigError, NonFiniteError, NotFoundError, SafegeomError

__all__ = [
    "SafeLoraLayer",
    "alignment_matrix",
    "apply_safe_lora",
    "lox_extrapolate",
    "lox_weights",
    "safe_lora_project",
]

_UNALIGNED = (
    "needs the unaligned base model's weights: pass --unaligned-base MODEL (the model the "
    "aligned one was trained from)"
)


def _require_unaligned(unaligned: object, what: str) -> None:
    if unaligned is None:
        raise ConfigError(f"{what} {_UNALIGNED}")


def _matrix(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise SafegeomError(f"{name} must be a 2-D [out, in] weight matrix, got {shape}")
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{name} contains NaN or inf")


def _same_shape(a: Tensor, b: Tensor, names: str) -> None:
    if a.shape != b.shape:
        raise SafegeomError(
            f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def alignment_matrix(V: Float[Tensor, "out in"]) -> Float[Tensor, "out out"]:
    """Safe LoRA's alignment matrix ``C = V Vᵀ / ‖V‖_F`` (float64), as docs/methods.md §8 has it.

    The paper (Hsu et al. 2024, eq. for ``Ĉ``) writes the same expression. It is the orthogonal
    projector onto ``span(V)`` only when ``V``'s non-zero singular values all equal ``√‖V‖_F``;
    in general it also rescales, and we keep the published form rather than ``V V⁺``.

    Raises:
        SafegeomError: ``V`` is not a finite matrix, or it is zero (the aligned and unaligned
            weights are equal, so there is no alignment subspace).
    """
    _matrix(V, "V")
    v = V.double()
    norm = torch.linalg.matrix_norm(v, "fro")
    if float(norm) == 0.0:
        raise SafegeomError(
            "V = W_aligned − W_unaligned is zero at this layer: the two models agree there, so "
            "there is no alignment subspace; check that --unaligned-base is the model the "
            "aligned one was trained from"
        )
    return v @ v.T / norm


def _cosine(a: Tensor, b: Tensor) -> float:
    na, nb = torch.linalg.matrix_norm(a, "fro"), torch.linalg.matrix_norm(b, "fro")
    if float(na) == 0.0 or float(nb) == 0.0:
        return 1.0 if float(na) == float(nb) == 0.0 else 0.0
    return float((a * b).sum() / (na * nb))


def safe_lora_project(
    delta: Float[Tensor, "out in"], V: Float[Tensor, "out in"], threshold: float
) -> tuple[Float[Tensor, "out in"], float]:
    """Safe LoRA on one layer: project ``ΔW`` onto ``C = V Vᵀ/‖V‖_F`` if it is not already aligned.

    Args:
        delta: the LoRA update ``ΔW = scaling · B A``.
        V: the alignment update ``W_aligned − W_unaligned`` of the same weight.
        threshold: τ in [0, 1]. The update is projected when its cosine similarity (Frobenius)
            to ``C ΔW`` is **below** τ, else kept. ``τ = 0`` never projects (``C`` is positive
            semi-definite, so the similarity is ≥ 0); ``τ = 1`` projects every update that is
            not already exactly its own projection.

    Returns:
        ``(update, similarity)``: ``C ΔW`` or ``ΔW`` (the input's dtype), and the cosine
        similarity ``⟨ΔW, CΔW⟩_F / (‖ΔW‖_F ‖CΔW‖_F)`` in [0, 1]. A zero update has similarity 1
        by convention (there is nothing to project) and is returned unchanged.

    Raises:
        SafegeomError: non-matrix or mismatched inputs, a zero ``V``, τ outside [0, 1].
    """
    check(
        isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0,
        "threshold",
        "must be a number in [0, 1]",
        threshold,
    )
    _matrix(delta, "delta")
    _same_shape(delta, V, "delta (the LoRA update) and V (the alignment update)")
    projected = alignment_matrix(V) @ delta.double()
    similarity = _cosine(delta.double(), projected)
    if float(torch.linalg.matrix_norm(delta.double(), "fro")) == 0.0:
        return delta.clone(), 1.0
    out = projected if similarity < threshold else delta.double()
    return out.to(delta.dtype), similarity


@dataclass(frozen=True)
class SafeLoraLayer:
    """What :func:`apply_safe_lora` did at one LoRA-wrapped weight."""

    name: str
    """The base weight's name (``model.layers.0.self_attn.q_proj.weight``)."""
    similarity: float
    """Cosine similarity of the LoRA update to its projection, in [0, 1]."""
    projected: bool
    """Whether the update was replaced by its projection (similarity < threshold)."""


def _base_name(module_name: str) -> str:
    for prefix in ("base_model.model.",):
        if module_name.startswith(prefix):
            module_name = module_name[len(prefix) :]
    return f"{module_name}.weight"


def apply_safe_lora(
    model: nn.Module,
    unaligned: Mapping[str, Tensor] | None,
    *,
    aligned: Mapping[str, Tensor] | None = None,
    threshold: float = 0.5,
    adapter: str = "default",
) -> tuple[SafeLoraLayer, ...]:
    """Apply Safe LoRA in place to every LoRA pair of a PEFT model (Hsu et al. 2024).

    For each LoRA-wrapped linear layer, ``ΔW = scaling · B A`` and ``V = W_aligned − W_unaligned``;
    where :func:`safe_lora_project` projects, ``B ← C B``, so the adapter stays rank-``r``
    (``C (s B A) = s (C B) A``).

    Args:
        model: a PEFT model (``peft.get_peft_model``) whose base is the aligned model.
        unaligned: the unaligned base model's weights by name (``model.layers.0.mlp.up_proj.weight``).
        aligned: the aligned weights by name; default: the PEFT model's own base-layer weights.
        threshold: τ, see :func:`safe_lora_project`.
        adapter: the PEFT adapter name.

    Returns:
        One :class:`SafeLoraLayer` per LoRA-wrapped weight, in module order.

    Raises:
        ConfigError: ``unaligned`` is None (names ``--unaligned-base``), or the model has no LoRA layer.
        NotFoundError: a weight missing from ``unaligned`` or ``aligned``.
    """
    _require_unaligned(unaligned, "Safe LoRA")
    assert unaligned is not None
    report = []
    for name, module in model.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict) or adapter not in lora_a:
            continue
        key = _base_name(name)
        base_w = aligned[key] if aligned is not None and key in aligned else None
        if aligned is not None and base_w is None:
            raise NotFoundError(
                f"aligned weights have no {key!r}; pass the aligned model's weights"
            )
        base_w = module.base_layer.weight if base_w is None else base_w
        if key not in unaligned:
            raise NotFoundError(
                f"--unaligned-base has no weight {key!r}; is it the same architecture?"
            )
        a, b = lora_a[adapter].weight, lora_b[adapter].weight
        scaling = float(module.scaling[adapter])
        V = base_w.detach().double().cpu() - unaligned[key].detach().double().cpu()
        delta = scaling * (b.detach().double().cpu() @ a.detach().double().cpu())
        _, similarity = safe_lora_project(delta, V, threshold)
        projected = similarity < threshold and float(delta.abs().max()) > 0.0
        if projected:
            with torch.no_grad():
                b.copy_((alignment_matrix(V) @ b.detach().double().cpu()).to(b.dtype))
        report.append(SafeLoraLayer(key, similarity, projected))
    if not report:
        raise ConfigError(
            f"the model has no LoRA layer (adapter {adapter!r}); Safe LoRA applies to a LoRA run"
        )
    return tuple(report)


def lox_extrapolate(
    W_align: Float[Tensor, "out in"], W_base: Float[Tensor, "out in"], k: int, alpha: float
) -> Float[Tensor, "out in"]:
    """LoX (Perin et al. 2025): ``W_align + α U_k U_kᵀ ΔW_align``, ``ΔW_align = W_align − W_base``.

    ``U_k``: the top-``k`` left singular vectors of ``ΔW_align`` (computed in float64). A ``k`` at
    or above the rank gives the whole update (``W_align + α ΔW_align``); ``k`` above
    ``min(out, in)`` is clamped to it, with the same result. A zero update returns ``W_align``.

    Args:
        k: number of singular directions, ≥ 1.
        alpha: extrapolation factor, ≥ 0 (0 returns ``W_align``). Negative values would move
            back toward the unaligned base, which is not LoX; they are refused.

    Returns:
        The extrapolated weight, in ``W_align``'s dtype.

    Raises:
        SafegeomError: non-matrix or mismatched inputs, ``k < 1``, negative or non-finite α;
        ConfigError naming ``--unaligned-base`` when ``W_base`` is None.
    """
    _require_unaligned(W_base, "LoX")
    check(
        isinstance(k, int) and not isinstance(k, bool) and k >= 1, "k", "must be an integer ≥ 1", k
    )
    check(
        isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0,
        "alpha",
        "must be a finite number ≥ 0 (LoX extrapolates away from the base)",
        alpha,
    )
    _matrix(W_align, "W_align")
    _matrix(W_base, "W_base")
    _same_shape(W_align, W_base, "W_align and W_base")
    delta = W_align.double() - W_base.double()
    u, _, _ = torch.linalg.svd(delta, full_matrices=False)
    u_k = u[:, : min(k, u.shape[1])]
    return (W_align.double() + alpha * (u_k @ (u_k.T @ delta))).to(W_align.dtype)


def lox_weights(
    aligned: Mapping[str, Tensor],
    unaligned: Mapping[str, Tensor] | None,
    *,
    k: int,
    alpha: float,
    names: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """LoX on a state dict: every 2-D weight in ``names`` (default: all 2-D weights in both).

    Returns:
        A new mapping: extrapolated tensors for the selected names, the others unchanged.

    Raises:
        ConfigError: ``unaligned`` is None (names ``--unaligned-base``), or no weight is selected.
        NotFoundError: a selected name missing from either model.
    """
    _require_unaligned(unaligned, "LoX")
    assert unaligned is not None
    if names is None:
        names = [n for n, w in aligned.items() if w.ndim == 2 and n in unaligned]
    if not names:
        raise ConfigError("LoX selected no weight matrix: the models share no 2-D weight names")
    out = dict(aligned)
    for name in names:
        for what, weights in (("the aligned model", aligned), ("--unaligned-base", unaligned)):
            if name not in weights:
                raise NotFoundError(f"{what} has no weight {name!r}")
        out[name] = lox_extrapolate(aligned[name], unaligned[name], k, alpha)
    return out
