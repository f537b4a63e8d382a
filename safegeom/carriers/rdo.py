"""Refusal Direction Optimisation and RDO cones (Wollschläger et al. 2025, docs/methods.md §3).

A unit vector ``r̂`` (or an orthonormal basis) is trained by gradient descent on

``λ_abl·CE(ablation target | ablate r̂) + λ_add·CE(addition target | add α r̂)
+ λ_ret·KL(base ‖ ablate r̂)``  (defaults 1, 0.2, 1; nats per target token),

with ``α = ‖r_DIM‖`` at the diff-in-means layer. Targets are greedy completions (30 tokens by
default): the DIM-ablated model on harmful prompts; the first sentence of DIM-ActAdd completions on
harmless prompts; the base model on harmless prompts (retain, for the KL). AdamW (lr 1e-2, betas
(0.9, 0.98)); gradients projected onto the sphere's tangent and clipped at norm 10; the vector is
renormalised (a basis re-orthonormalised by sign-fixed QR) after each step. The model's parameters
are frozen (``requires_grad`` False, restored afterwards); hooks let gradients flow into r̂ only.
Initialisation is our choice (:class:`RDOConfig`: r̂_DIM by default, or seeded random).

Single-process. Under a launcher, with the sharded twins installed by the entry points
(:mod:`safegeom.execution`), the targets' generations and the cone's scores are shared out over
the ranks; the gradient descent itself runs whole on every rank, and every rank continues with
rank 0's vector (the ``agreed`` twin, :func:`safegeom.parallel.agreement.agreed`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from safegeom.carriers.carrier import Carrier
from safegeom.carriers.cones import score_cone
from safegeom.carriers.inputs import Prompts, check_k, prompt_provenance
from safegeom.config import check
from safegeom.execution import agreed, shows_progress, twin
from safegeom.hooks import Hook, attach, site_hook_point
from safegeom.interventions import ABLATION_SITES, ablate, add
from safegeom.models.chat import EncodedPrompt, collate_left, encode_prompts
from safegeom.models.loading import LoadedModel
from safegeom.models.plain_text import encode_plain
from safegeom.prompts import load_prompts

__all__ = ["RDOConfig", "RDOTargets", "first_sentence", "rdo_cone", "rdo_direction", "rdo_targets"]

Pair = tuple[tuple[int, ...], tuple[int, ...]]  # (prompt ids, target ids)
_TERMS = ("ablation", "addition", "retain")


@dataclass(frozen=True)
class RDOTargets:
    """``(prompt_ids, target_ids)`` pairs per loss term: ``ablation`` (harmful → DIM-ablated
    completions), ``addition`` (harmless → first sentence of DIM-ActAdd completions), ``retain``
    (harmless → base completions, the KL positions)."""

    ablation: tuple[Pair, ...]
    addition: tuple[Pair, ...]
    retain: tuple[Pair, ...]


def first_sentence(text: str) -> str:
    """``text`` up to and including its first ``.``, ``!``, ``?`` or line break (else all)."""
    match = re.search(r"[.!?](\s|$)|\n", text)
    return text[: match.start() + 1] if match else text


def rdo_targets(
    lm: LoadedModel,
    harmful: Prompts,
    harmless: Prompts,
    dim_carrier: Carrier,
    *,
    max_new_tokens: int = 30,
    system: str | None = None,
    progress: bool = False,
) -> RDOTargets:
    """Greedy targets for RDO (docs/methods.md §3), ``max_new_tokens`` each; an empty
    completion becomes the EOS token (the model stopping is its target). With the sharded twins
    installed (:mod:`safegeom.execution`) the generations are shared out over the ranks and every
    rank gets one process's targets."""
    from safegeom.generation import as_context, generate

    h_set, s_set = load_prompts(harmful), load_prompts(harmless)
    r = dim_carrier.direction

    def run(prompts, intervention, cut=lambda t: t):
        common = {"max_new_tokens": max_new_tokens, "system": system, "progress": progress}
        shared = twin("generate")
        if shared is None:
            texts = generate(lm, prompts, intervention=intervention, **common)
        else:
            with as_context(intervention, lm):
                texts = shared(lm, prompts, batch_size=None, **common)
        enc = encode_prompts(
            lm.tokenizer, prompts.prompts, system=system, chat_template=lm.chat_template
        )
        pairs = []
        for e, text in zip(enc, texts, strict=True):
            ids = encode_plain(lm.tokenizer, cut(text))[:max_new_tokens]
            pairs.append((e.input_ids, tuple(ids) or (int(lm.tokenizer.eos_token_id),)))
        return tuple(pairs)

    return RDOTargets(
        ablation=run(h_set, lambda: ablate(lm, r)),
        addition=run(s_set, lambda: add(lm, r, layers=dim_carrier.layer), first_sentence),
        retain=run(s_set, None),
    )


@contextlib.contextmanager
def _ablating(lm: LoadedModel, u: Float[Tensor, " d"]) -> Iterator[None]:
    """Differentiable directional ablation of unit ``u`` at every block input, attention and MLP
    output (the hook keeps the graph to ``u``)."""

    def fn(hidden: Tensor) -> Tensor:
        v = u.to(hidden.device, hidden.dtype)
        return hidden - (hidden @ v)[..., None] * v

    sites = [site_hook_point(lm, s, i) for i in range(lm.n_layers) for s in ABLATION_SITES]
    with attach([Hook(module, when, fn) for module, when in sites]):
        yield


@contextlib.contextmanager
def _adding(lm: LoadedModel, vector: Float[Tensor, " d"], layer: int) -> Iterator[None]:
    with attach([Hook(lm.blocks[layer], "pre", lambda h: h + vector.to(h.device, h.dtype))]):
        yield


def _target_logprobs(lm: LoadedModel, pairs: Sequence[Pair]) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probs ``[B, T, V]`` predicting the last T tokens, those tokens ``[B, T]`` and a mask
    ``[B, T]`` of real target tokens (T = the longest target; left padding)."""
    width = max(len(t) for _, t in pairs)
    seqs = [EncodedPrompt(p + t, len(p + t) - 1, 0) for p, t in pairs]
    batch = collate_left(seqs, lm.tokenizer.pad_token_id).to(lm.device)
    keep = "logits_to_keep" in inspect.signature(lm.base.forward).parameters
    logits = lm.model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        **({"logits_to_keep": width + 1} if keep else {}),
    ).logits[:, -(width + 1) : -1]
    n_t = torch.tensor([len(t) for _, t in pairs], device=lm.device)
    mask = torch.arange(width, device=lm.device)[None] >= (width - n_t)[:, None]
    return logits.float().log_softmax(-1), batch.input_ids[:, -width:], mask


def _term(lm: LoadedModel, pairs: Sequence[Pair], base: Tensor | None = None) -> Tensor:
    """Mean CE of the target tokens (nats/token); with ``base`` log-probs, the mean
    KL(base ‖ model) over the target positions instead."""
    logp, labels, mask = _target_logprobs(lm, pairs)
    if base is None:
        per_token = -logp.gather(-1, labels[..., None])[..., 0]
    else:
        per_token = (base.exp() * (base - logp)).sum(-1)
    return (per_token * mask).sum() / mask.sum()


@contextlib.contextmanager
def _frozen(lm: LoadedModel) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in lm.model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _orthonormal_rows(b: Tensor) -> Tensor:
    q, r = torch.linalg.qr(b.double().T)
    return (q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)).T.to(b.dtype)


def _batches(n: int, size: int, gen: torch.Generator) -> Iterator[list[int]]:
    while True:
        order = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n, size):
            yield order[start : start + size]


@dataclass(frozen=True)
class RDOConfig:
    """Settings of RDO and RDO cones (:func:`rdo_cone`); defaults follow Wollschläger et al. 2025,
    except ``init`` (our choice).

    Example:
        >>> RDOConfig(k=2, lambdas=[1, 0.5, 1]).lambdas
        (1.0, 0.5, 1.0)
        >>> RDOConfig(steps=0)
        Traceback (most recent call last):
        ...
        safegeom.errors.ConfigError: steps (--steps) must be at least 1, got 0
    """

    k: int = 3
    """Cone dimension: orthonormal rows trained (1 ≤ k ≤ the hidden size; docs/methods.md §3 uses
    2–5). :func:`rdo_direction` trains one direction whatever it says."""
    steps: int = 100
    """AdamW steps."""
    lr: float = 1e-2
    """AdamW learning rate."""
    lambdas: tuple[float, float, float] = (1.0, 0.2, 1.0)
    """Loss weights (λ_abl, λ_add, λ_ret) of the ablation CE, the addition CE and the retain KL."""
    seed: int = 0
    """Seeds the initialisation, the minibatch order, the sampled combinations and the scoring."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW's betas."""
    weight_decay: float = 0.0
    """AdamW's weight decay (moot for a renormalised vector)."""
    clip: float = 10.0
    """Gradient-norm clip, applied after the projection onto the sphere's tangent."""
    batch_size: int = 16
    """Target pairs per loss term per step (seeded, reshuffled passes)."""
    max_new_tokens: int = 30
    """Length of the greedy targets, in tokens."""
    init: Literal["dim", "random"] = "dim"
    """Starting rows: dim (r̂_DIM, then seeded random rows for a cone) or random (our choice)."""
    n_combinations: int = 4
    """Cone combinations sampled per step (k > 1)."""
    score: bool = True
    """Score the result after training (:func:`~safegeom.carriers.cones.score_cone`)."""
    n_score_combinations: int = 8
    """Cone combinations scored (k > 1)."""

    def __post_init__(self) -> None:
        """Coerce ``lambdas`` and ``betas`` to tuples of floats and check every range.

        Raises:
            ConfigError: a value out of range; the message names the field and its flag.
        """
        for name, size in (("lambdas", 3), ("betas", 2)):
            value = getattr(self, name)
            ok = isinstance(value, (tuple, list)) and len(value) == size
            check(ok, name, f"must be {size} numbers", value)
            ok = all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in value)
            check(ok, name, "must be finite numbers, 0 or more", value)
            object.__setattr__(self, name, tuple(float(v) for v in value))
        check(all(b < 1 for b in self.betas), "betas", "must lie in [0, 1)", self.betas)
        check(_whole(self.k) and self.k >= 1, "k", "must be at least 1", self.k)
        check(_whole(self.steps) and self.steps >= 1, "steps", "must be at least 1", self.steps)
        check(_positive(self.lr), "lr", "must be a positive number", self.lr)
        check(_whole(self.seed), "seed", "must be a whole number", self.seed)
        decay = self.weight_decay
        check(math.isfinite(decay) and decay >= 0, "weight_decay", "must be 0 or more", decay)
        check(_positive(self.clip), "clip", "must be a positive number", self.clip)
        check(self.batch_size >= 1, "batch_size", "must be at least 1", self.batch_size)
        n_new = self.max_new_tokens
        check(n_new >= 1, "max_new_tokens", "must be at least 1", n_new)
        check(self.init in ("dim", "random"), "init", "must be dim or random", self.init)
        n = self.n_combinations
        check(n >= 0, "n_combinations", "must be 0 or more", n)
        n = self.n_score_combinations
        check(n >= 0, "n_score_combinations", "must be 0 or more", n)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _train(lm, init, targets, dim, n_comb, *, config, progress):
    """Optimise rows ``init`` [k, d]; return (final rows, per-step losses, last loss terms)."""
    alpha, layer = float(dim.direction.norm()), dim.layer
    gen = torch.Generator().manual_seed(config.seed)
    rows = torch.nn.Parameter(_orthonormal_rows(init.to(lm.device, torch.float32)))
    opt = torch.optim.AdamW(
        [rows], lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    pools = [getattr(targets, t) for t in _TERMS]
    streams = [_batches(len(pool), config.batch_size, gen) for pool in pools]
    weights = torch.tensor(config.lambdas, dtype=torch.float32)
    n_dirs = rows.shape[0] + n_comb
    history: list[float] = []
    terms: dict[str, float] = {}
    bar = tqdm(range(config.steps), desc="rdo", disable=not progress)
    with _frozen(lm):
        for _ in bar:
            picks = [[pool[i] for i in next(s)] for pool, s in zip(pools, streams, strict=True)]
            with torch.no_grad():
                base = _target_logprobs(lm, picks[2])[0]
            mix = torch.randn(n_comb, rows.shape[0], generator=gen).abs().to(lm.device)
            opt.zero_grad()
            sums = torch.zeros(3)
            for j in range(n_dirs):
                units = rows / rows.norm(dim=-1, keepdim=True)
                u = units[j] if j < rows.shape[0] else mix[j - rows.shape[0]] @ units
                u = u / u.norm()
                with _ablating(lm, u):
                    abl, ret = _term(lm, picks[0]), _term(lm, picks[2], base)
                with _adding(lm, alpha * u, layer):
                    addn = _term(lm, picks[1])
                parts = torch.stack([abl, addn, ret])
                ((weights.to(parts.device) * parts).sum() / n_dirs).backward()
                sums += parts.detach().float().cpu() / n_dirs
            with torch.no_grad():  # tangent projection per row, clip, step, re-orthonormalise
                x = rows / rows.norm(dim=-1, keepdim=True)
                rows.grad -= (rows.grad * x).sum(-1, keepdim=True) * x
            torch.nn.utils.clip_grad_norm_([rows], config.clip)
            opt.step()
            with torch.no_grad():
                rows.copy_(_orthonormal_rows(rows))
            history.append(float((weights * sums).sum()))
            terms = {"abl_ce": float(sums[0]), "add_ce": float(sums[1]), "ret_kl": float(sums[2])}
            bar.set_postfix(loss=f"{history[-1]:.4f}")
    return rows.detach().cpu(), history, terms


def rdo_cone(
    lm: LoadedModel,
    harmful: Prompts,
    harmless: Prompts,
    dim_carrier: Carrier,
    config: RDOConfig = RDOConfig(),
    *,
    targets: RDOTargets | None = None,
    harmful_val: Prompts | None = None,
    harmless_val: Prompts | None = None,
    system: str | None = None,
    progress: bool = True,
) -> Carrier:
    """Train an RDO refusal cone of ``config.k`` orthonormal rows (docs/methods.md §3).

    Each step samples ``config.n_combinations`` combinations ``normalise(sᵀB)``,
    ``s = |N(0, I_k)|``, and averages the RDO loss over the ``k`` basis vectors and them, so every
    direction of the cone must ablate and induce refusal; the basis is re-orthonormalised
    (sign-fixed QR) after each step.

    Args:
        harmful, harmless: training prompts (ablation targets from harmful, addition and retain
            targets from harmless).
        dim_carrier: the diff-in-means refusal carrier: its layer and norm give α, it makes the
            targets and (``config.init="dim"``) the first starting row.
        config: the settings (:class:`RDOConfig`: ``k``, ``steps``, ``lr``, ``lambdas``,
            ``seed`` ...).
        targets: precomputed :func:`rdo_targets` (else generated).
        harmful_val, harmless_val: scoring prompts (default: the training prompts).
        system: system prompt rendered into every conversation.
        progress: show progress bars.

    Returns:
        A :class:`Carrier` (``method="cone-rdo"``) with ``k`` orthonormal rows; ``scores``:
        ``alpha`` (‖r_DIM‖, activation units), ``loss_initial``/``loss_final`` (weighted loss, nats
        per token), the last step's ``abl_ce``, ``add_ce``, ``ret_kl``, ``cos_dim`` (first row vs
        r̂_DIM) and, when scored, :func:`~safegeom.carriers.cones.score_cone`'s. Per-step losses
        are in ``provenance["losses"]``.

    Raises:
        SafegeomError: empty prompt sets, a hidden-size mismatch, ``k`` above the hidden size.
    """
    dim = dim_carrier
    dim.check_model(lm.d_model, lm.weight_hash)
    k = check_k(config.k, lm.d_model)
    h_set, s_set = load_prompts(harmful), load_prompts(harmless)
    targets = targets or rdo_targets(
        lm,
        h_set,
        s_set,
        dim,
        max_new_tokens=config.max_new_tokens,
        system=system,
        progress=progress,
    )
    start = torch.randn(k, lm.d_model, generator=torch.Generator().manual_seed(config.seed))
    if config.init == "dim":
        start[0] = dim.unit
    n_comb = config.n_combinations if k > 1 else 0
    final, history, terms = agreed(
        _train,
        lm,
        start,
        targets,
        dim,
        n_comb,
        config=config,
        progress=progress and shows_progress(),
    )  # under the twin: rank 0's, should a GPU's steps differ by rank
    alpha = float(dim.direction.norm())
    scores = {"alpha": alpha, "loss_initial": history[0], "loss_final": history[-1], **terms}
    scores["cos_dim"] = float(final[0] @ dim.unit)
    if config.score:
        scores |= score_cone(
            lm,
            final,
            alpha,
            dim.layer,
            h_set if harmful_val is None else harmful_val,
            s_set if harmless_val is None else harmless_val,
            seed=config.seed,
            system=system,
            n_combinations=config.n_score_combinations if k > 1 else 0,
        )
    provenance = {
        **prompt_provenance(lm, h_set, s_set),
        "dim_layer": dim.layer,
        "dim_position": dim.position,
        "dim_method": dim.method,
        "k": k,
        "steps": config.steps,
        "lr": config.lr,
        "lambdas": list(config.lambdas),
        "seed": config.seed,
        "config": asdict(config),
        "losses": history,
        "system": system,
    }
    return Carrier(
        vectors=final,
        kind="refusal",
        method="cone-rdo",
        site="resid_pre",
        layer=dim.layer,
        position=dim.position,
        scores=scores,
        provenance=provenance,
    )


def rdo_direction(
    lm: LoadedModel,
    harmful: Prompts,
    harmless: Prompts,
    dim_carrier: Carrier,
    config: RDOConfig = RDOConfig(),
    *,
    targets: RDOTargets | None = None,
    harmful_val: Prompts | None = None,
    harmless_val: Prompts | None = None,
    system: str | None = None,
    progress: bool = True,
) -> Carrier:
    """Train a refusal direction with RDO (docs/methods.md §3): :func:`rdo_cone` with ``k = 1``.

    ``config.k`` is not used (one direction); the other arguments are :func:`rdo_cone`'s.

    Returns:
        A :class:`Carrier` (``method="rdo"``) whose vector is ``α·r̂`` (activation units, the scale
        used for addition); ``scores`` as :func:`rdo_cone`'s (scored: ``bypass_0``, ``induce_0``
        in refusal log-odds, ``kl_0`` in nats).

    Raises:
        SafegeomError: as :func:`rdo_cone`.
    """
    cone = rdo_cone(
        lm,
        harmful,
        harmless,
        dim_carrier,
        replace(config, k=1),
        targets=targets,
        harmful_val=harmful_val,
        harmless_val=harmless_val,
        system=system,
        progress=progress,
    )
    prov = {key: v for key, v in cone.provenance.items() if key != "k"}
    return replace(cone, vectors=cone.vectors * cone.scores["alpha"], method="rdo", provenance=prov)
