"""Intervention functions on the residual stream: context managers over hooks that always clean up.

The everyday spelling is the values of :mod:`safegeom.interventions.values` (``Ablation``,
``Addition``, ``AffineEdit``); these functions are their implementation.

- :func:`ablate`: directional or subspace ablation ``h ← h − B Bᵀ h`` at every block input and
  every attention and MLP output (Arditi et al. 2024), or at chosen layers;
- :func:`add`: activation addition ``h ← h + c·v`` at chosen layers and positions;
- :func:`affine_edit`: the affine concept edit of Marshall et al. ("Refusal in LLMs is an affine
  function"): ``h ← h − (h·r̂) r̂ + (μ·r̂) r̂ + α r̂`` with μ a reference mean (harmless prompts), so
  α = 0 moves every state to the reference's coordinate and α sets refusal directly;
- :func:`orthogonalize_weights`: the weight-space twin of :func:`ablate`, returning an edited
  *copy* that can be saved as a normal HF checkpoint.

Row-wise variants (a different direction per batch row) let carrier selection score many
candidates in one batched forward pass: see :func:`ablate_rows` and :func:`add_rows`.

Positions for addition: ``all`` (every position, generated tokens included), ``prompt`` (the
prompt forward pass only), or ``instruction`` (the prompt pass, all positions before the
``t_post`` template tokens).

With a model spread over devices (``load_model(..., LoadConfig(device_map=...))``) each hook applies its
direction on the device of the hidden state it edits (:class:`~safegeom.hooks.PerDevice`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from safegeom.errors import ConfigError, NonFiniteError, SafegeomError
from safegeom.hooks import Hook, PerDevice, attach, site_hook_point
from safegeom.models.chat import encode_prompts
from safegeom.models.layout import resolve
from safegeom.models.loading import LoadedModel
from safegeom.models.positions import parse_layers

__all__ = [
    "ABLATION_SITES",
    "ablate",
    "ablate_rows",
    "add",
    "add_rows",
    "affine_edit",
    "as_basis",
    "orthogonalize_weights",
]

ABLATION_SITES = ("resid_pre", "attn_out", "mlp_out")
Positions = Literal["all", "prompt", "instruction"]


def as_basis(vectors: Tensor, d_model: int) -> Float[Tensor, "d k"]:
    """An orthonormal ``[d, k]`` basis (float32) of a direction ``[d]`` or vectors ``[d, k]``/``[k, d]``.

    Raises:
        SafegeomError: a hidden-size mismatch or a zero vector.
        NonFiniteError: NaN or inf.
    """
    v = torch.as_tensor(vectors).detach().to(torch.float64)
    shape = tuple(v.shape)
    if v.dim() == 1:
        v = v[:, None]
    if v.dim() != 2 or d_model not in v.shape:
        raise SafegeomError(
            f"hidden-size mismatch: carrier has shape {shape}, the model's hidden size is {d_model}"
        )
    if v.shape[0] != d_model:
        v = v.T
    if not torch.isfinite(v).all():
        raise NonFiniteError("carrier contains NaN or inf")
    if bool((v.norm(dim=0) == 0).any()):
        raise SafegeomError("cannot ablate a zero vector")
    q, _ = torch.linalg.qr(v)
    return q


def _project_out(basis: Tensor):
    cached = PerDevice(basis)

    def fn(hidden: Tensor) -> Tensor:
        b = cached.like(hidden)
        return hidden - (hidden @ b) @ b.T

    return fn


def _hooked(lm: LoadedModel, fn: Any, layers: Any, sites: Sequence[str]) -> Any:
    """``fn`` hooked at every site of every layer of ``layers``; removed when the block ends."""
    return attach(
        [
            Hook(*site_hook_point(lm, site, layer), fn)
            for layer in parse_layers(layers, lm.n_layers)
            for site in sites
        ]
    )


@contextmanager
def ablate(
    lm: LoadedModel,
    vectors: Tensor,
    *,
    layers: str | Sequence[int] | None = "all",
    sites: Sequence[str] = ABLATION_SITES,
) -> Iterator[None]:
    """Project ``vectors`` (a direction ``[d]`` or basis ``[d, k]``) out of the residual stream.

    By default at every block input and every attention and MLP output, so no layer can write the
    direction back. The model is unchanged after the block.

    Yields:
        Nothing; the hooks are attached for the block and removed after it, even on an error.
    """
    basis = as_basis(vectors, lm.d_model).to(lm.device)
    fn = _project_out(basis)
    with _hooked(lm, fn, layers, sites):
        yield


def _n_post(lm: LoadedModel) -> int:
    return encode_prompts(lm.tokenizer, ["x"], chat_template=lm.chat_template)[0].n_post


def _position_mask(positions: Positions, n_post: int):
    """A function hidden → multiplier mask ``[1, seq, 1]`` (or None for 'apply everywhere')."""
    if positions not in ("all", "prompt", "instruction"):
        raise ConfigError(f"unknown positions {positions!r}: use all, prompt or instruction")

    def mask(hidden: Tensor) -> Tensor | None:
        seq = hidden.shape[1]
        if positions == "all":
            return None
        if seq == 1:  # a generation step with a KV cache: not part of the prompt
            return hidden.new_zeros(1, 1, 1)
        if positions == "prompt":
            return None
        m = hidden.new_ones(1, seq, 1)
        m[:, max(seq - n_post, 0) :] = 0
        return m

    return mask


@contextmanager
def add(
    lm: LoadedModel,
    vector: Tensor,
    *,
    layers: str | int | Sequence[int],
    coeff: float = 1.0,
    positions: Positions = "all",
    site: str = "resid_pre",
) -> Iterator[None]:
    """Add ``coeff · vector`` (unnormalised) to ``site`` at ``layers`` for the duration of the block.

    ``coeff=+1`` with a refusal direction induces refusal; ``-1`` bypasses it (Arditi et al.).

    Yields:
        Nothing; the hooks are attached for the block and removed after it, even on an error.

    Raises:
        NonFiniteError: ``coeff`` or the vector is NaN or infinite.
    """
    if not math.isfinite(float(coeff)):
        raise NonFiniteError(f"addition coefficient (--coeff) must be finite, got {coeff}")
    v = PerDevice(_check_vector(vector, lm.d_model).to(lm.device))
    mask = _position_mask(positions, _n_post(lm) if positions == "instruction" else 0)

    def fn(hidden: Tensor) -> Tensor:
        m = mask(hidden)
        delta = coeff * v.like(hidden)
        return hidden + (delta if m is None else m * delta)

    hooks = [
        Hook(*site_hook_point(lm, site, layer), fn) for layer in parse_layers(layers, lm.n_layers)
    ]
    with attach(hooks):
        yield


@contextmanager
def affine_edit(
    lm: LoadedModel,
    direction: Tensor,
    reference_mean: Tensor,
    *,
    alpha: float = 0.0,
    layers: str | int | Sequence[int] = "all",
    site: str = "resid_pre",
) -> Iterator[None]:
    """Affine concept edit: ``h ← h − (h·r̂) r̂ + (μ·r̂) r̂ + α r̂`` at ``site`` of ``layers``.

    ``reference_mean`` (μ) is the mean activation of harmless prompts at the same site and layer
    (one vector ``[d]`` for all layers, or ``[n_layers_selected, d]``). ``alpha`` is in units of
    the residual norm along r̂: 0 gives every prompt the reference's refusal coordinate.

    Yields:
        Nothing; the hooks are attached for the block and removed after it, even on an error.

    Raises:
        SafegeomError: ``reference_mean`` has the wrong shape.
        NonFiniteError: ``alpha`` is NaN or infinite.
    """
    if not math.isfinite(float(alpha)):
        raise NonFiniteError(f"affine-edit alpha (--coeff) must be finite, got {alpha}")
    r = _check_vector(direction, lm.d_model).to(lm.device, torch.float32)
    r = r / r.norm()
    layer_ids = parse_layers(layers, lm.n_layers)
    mu = torch.as_tensor(reference_mean).to(lm.device, torch.float32)
    mu = mu.expand(len(layer_ids), lm.d_model) if mu.dim() == 1 else mu
    if mu.shape != (len(layer_ids), lm.d_model):
        raise SafegeomError(
            f"reference_mean must be [d] or [{len(layer_ids)}, d], got {tuple(mu.shape)}"
        )

    unit = PerDevice(r)

    def make(j: int):
        anchor = float(mu[j] @ r) + alpha

        def fn(hidden: Tensor) -> Tensor:
            rr = unit.like(hidden)
            return hidden - (hidden @ rr)[..., None] * rr + anchor * rr

        return fn

    hooks = [Hook(*site_hook_point(lm, site, layer), make(j)) for j, layer in enumerate(layer_ids)]
    with attach(hooks):
        yield


def _check_vector(vector: Tensor, d_model: int) -> Tensor:
    v = torch.as_tensor(vector).detach().float()
    if v.shape != (d_model,):
        raise SafegeomError(
            f"hidden-size mismatch: vector has shape {tuple(v.shape)}, the model's hidden size "
            f"is {d_model}"
        )
    if not torch.isfinite(v).all():
        raise NonFiniteError("vector contains NaN or inf")
    return v


@contextmanager
def ablate_rows(
    lm: LoadedModel,
    directions: Float[Tensor, "batch d"],
    *,
    sites: Sequence[str] = ABLATION_SITES,
    layers: str | Sequence[int] | None = "all",
    strength: Float[Tensor, " batch"] | float = 1.0,
) -> Iterator[None]:
    """Ablate a *different* unit direction from each batch row, at ``layers`` and ``sites``.

    ``h ← h − s_b (h·u_b) u_b`` with ``s_b = strength[b]`` (1 removes the component, 0 does
    nothing). Used to score many candidates in one batched forward pass: repeat the prompts once
    per candidate and give each copy its candidate's direction.
    """
    units = directions.to(lm.device, torch.float32)
    units = units / units.norm(dim=-1, keepdim=True)
    scale = torch.as_tensor(strength, dtype=torch.float32, device=lm.device).expand(units.shape[0])
    unit_rows, scaled = (
        PerDevice(units[:, None, :]),
        PerDevice((units * scale[:, None])[:, None, :]),
    )

    def fn(hidden: Tensor) -> Tensor:
        u = unit_rows.like(hidden)
        return hidden - (hidden * u).sum(-1, keepdim=True) * scaled.like(hidden)

    with _hooked(lm, fn, layers, sites):
        yield


@contextmanager
def add_rows(
    lm: LoadedModel,
    vectors: Float[Tensor, "batch d"],
    layers: Sequence[int],
    *,
    coeff: float = 1.0,
) -> Iterator[None]:
    """Add ``coeff · vectors[b]`` at the block input of ``layers[b]``, all positions, per row."""
    vecs = vectors.to(lm.device, torch.float32)
    row_layers = torch.as_tensor(list(layers), device=lm.device)

    def make(layer: int):
        rows = (row_layers == layer).to(vecs.dtype)[:, None]
        delta = PerDevice((coeff * rows * vecs)[:, None, :])

        def fn(hidden: Tensor) -> Tensor:
            return hidden + delta.like(hidden)

        return fn

    hooks = [Hook(lm.blocks[layer], "pre", make(layer)) for layer in sorted(set(layers))]
    with attach(hooks):
        yield


def orthogonalize_weights(
    lm: LoadedModel, vectors: Tensor, *, allow_inexact: bool = False
) -> LoadedModel:
    """Return an edited *copy* whose weights never write ``vectors`` into the residual stream.

    ``W ← W − r̂ r̂ᵀ W`` on every attention-out and MLP-down projection (and their biases), and
    ``E ← E − E r̂ r̂ᵀ`` on the token (and position) embeddings; for a basis ``[d, k]`` the
    projector is ``B Bᵀ``. The copy equals :func:`ablate` at every block input and every attention
    and MLP output, and saves with ``copy.model.save_pretrained(dir)`` as a normal checkpoint.

    Raises:
        SafegeomError: the architecture normalises sub-layer outputs before the residual add (Gemma
            2/3), where the edit is not equal to hook ablation, unless ``allow_inexact=True``; or
            the model still carries an unmerged PEFT adapter.
    """
    if lm.layout.post_norm and not allow_inexact:
        raise SafegeomError(
            f"{lm.model_type} normalises sub-layer outputs before the residual add, so weight "
            "orthogonalisation is not equal to hook ablation; pass allow_inexact=True to edit anyway"
        )
    if lm.adapter and not lm.merged:
        raise SafegeomError(
            "merge the PEFT adapter first: load_model(..., LoadConfig(merge_adapter=True))"
        )
    if any(p.device.type == "meta" for p in lm.model.parameters()):
        raise SafegeomError(
            "orthogonalize_weights edits every weight in memory, but the device map offloaded some "
            "to disk; load the model without offloading, or use ablate() (hooks) instead"
        )
    basis = as_basis(vectors, lm.d_model)
    model = copy.deepcopy(lm.model)
    edited = LoadedModel(
        model=model,
        tokenizer=lm.tokenizer,
        name=f"{lm.name}+orthogonalized",
        source=lm.source,
        layout=lm.layout,
        chat_template=lm.chat_template,
    )
    with torch.no_grad():
        _untie_output_embeddings(model, resolve(model, lm.layout.embed))
        for path in (lm.layout.embed, *lm.layout.extra_embeds):
            weight = resolve(model, path).weight  # [vocab, d]
            b = basis.to(weight.device, torch.float64)
            w = weight.double()
            weight.copy_(w - (w @ b) @ b.T)
        for block in edited.blocks:
            for path in (lm.layout.o_proj, lm.layout.down_proj):
                module = resolve(block, path)
                b = basis.to(module.weight.device, torch.float64)
                w = module.weight.double()
                if lm.layout.conv1d:  # Conv1D stores (in, out): the output is w's last dim
                    module.weight.copy_(w - (w @ b) @ b.T)
                else:  # nn.Linear stores (out, in)
                    module.weight.copy_(w - b @ (b.T @ w))
                if getattr(module, "bias", None) is not None:
                    bias = module.bias.double()
                    module.bias.copy_(bias - b @ (b.T @ bias))
    return edited


def _untie_output_embeddings(model: torch.nn.Module, embed: torch.nn.Module) -> None:
    """Give the LM head its own copy of tied embeddings, so editing the input side leaves the
    unembedding (which reads the residual stream, not writes it) untouched."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and head.weight is embed.weight:
        head.weight = torch.nn.Parameter(embed.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model, "_tied_weights_keys"):
            model._tied_weights_keys = None
