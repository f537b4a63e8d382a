"""Adaptive regularisation (docs/methods.md §7, "Learning to Stay Safe", 2026): weights, loss, risk.

Each batch gets a risk ``r ∈ [1, 5]``; the loss mixes the task loss and the KL to a frozen
reference copy of the initial model with weights that follow the risk:
``kl_w = clamp((r − 2)/3, 0.1, 0.9)``, ``sft_w = clamp(1 − kl_w, 0.1, 0.9)``,
``loss = sft_w · L_SFT + kl_w · KL(P_ref ‖ P_θ)`` over answer tokens.

The risk comes from a :class:`RiskCritic`: the activation probe :class:`RiskProbe` (the paper's
predictor, with a logistic probe in place of its d→512→2 MLP, as docs/methods.md §7 allows) or the
:class:`JudgeCritic` around any :class:`~safegeom.judges.Judge` (our proposal, see there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from safegeom.artifacts import Provenance, read_safetensors, save_safetensors
from safegeom.batching import longest_first
from safegeom.carriers.probes import fit_probe
from safegeom.config import check, config_dict
from safegeom.errors import ArtifactError, ConfigError, NonFiniteError, SafegeomError
from safegeom.generation import encode_chat, generate
from safegeom.hooks import Hook, attach, site_hook_point
from safegeom.judges import Judge
from safegeom.models.chat import collate_left
from safegeom.models.loading import LoadedModel
from safegeom.models.positions import parse_layers
from safegeom.prompts import Prompts, combine_prompts, load_prompts

__all__ = [
    "JudgeCritic",
    "RiskCritic",
    "RiskProbe",
    "RiskProbeConfig",
    "adaptive_loss",
    "adaptive_weights",
    "answer_kl",
    "fit_risk_probe",
    "pooled_hidden",
    "token_kl",
]

RISK_MIN, RISK_MAX = 1.0, 5.0


def adaptive_weights(risk: float | Tensor) -> tuple[float, float] | tuple[Tensor, Tensor]:
    """§7's weights ``(sft_w, kl_w)`` for a risk in [1, 5] (a float, or a tensor of per-batch risks).

    ``kl_w = clamp((r − 2)/3, 0.1, 0.9)`` and ``sft_w = clamp(1 − kl_w, 0.1, 0.9)``: r = 1 gives
    (0.9, 0.1), r = 2 (0.9, 0.1), r = 3.5 (0.5, 0.5), r = 5 (0.1, 0.9).

    Returns:
        ``(sft_w, kl_w)``: floats for a float risk, float tensors of the risk's shape otherwise.

    Raises:
        ConfigError: a risk outside [1, 5] or NaN.
    """
    r = torch.as_tensor(risk, dtype=torch.float64)
    bad = torch.isnan(r) | (r < RISK_MIN) | (r > RISK_MAX)
    if bool(bad.any()):
        value = float(r.flatten()[bad.flatten()][0])
        raise ConfigError(f"risk must lie in [1, 5] (1 = harmless, 5 = harmful), got {value}")
    kl_w = ((r - 2.0) / 3.0).clamp(0.1, 0.9)
    sft_w = (1.0 - kl_w).clamp(0.1, 0.9)
    if isinstance(risk, Tensor):
        dtype = risk.dtype if risk.is_floating_point() else torch.float32
        return sft_w.to(dtype), kl_w.to(dtype)
    return float(sft_w), float(kl_w)


def adaptive_loss(sft_loss: Tensor, kl: Tensor, risk: float | Tensor) -> Tensor:
    """``sft_w · L_SFT + kl_w · KL`` with §7's weights for ``risk`` (same units as the losses, nats).

    ``sft_loss``, ``kl`` and a tensor ``risk`` broadcast together (a scalar or one per batch).
    """
    sft_w, kl_w = adaptive_weights(risk)
    return sft_w * sft_loss + kl_w * kl


def answer_kl(
    ref_logits: Float[Tensor, "batch seq vocab"],
    logits: Float[Tensor, "batch seq vocab"],
    mask: Tensor,
) -> Float[Tensor, ""]:
    """``KL(P_ref ‖ P_θ)`` in nats, mean over the answer tokens selected by ``mask``.

    ``mask[b, t]`` is true where ``logits[b, t]`` predicts an answer token (the caller shifts it
    as for the LM loss). A ``-inf`` reference logit (a token the reference never emits)
    contributes 0. Computed in float32, or float64 when either input is float64; the
    gradient flows through ``logits`` only (``ref_logits`` are detached).

    Returns:
        A scalar tensor ≥ 0 in the dtype of the computation.

    Raises:
        SafegeomError: mismatched shapes or an empty mask; NonFiniteError: non-finite logits.
    """
    if ref_logits.shape != logits.shape or mask.shape != logits.shape[:-1]:
        raise SafegeomError(
            f"answer_kl needs ref_logits and logits of one shape [batch, seq, vocab] and a mask "
            f"[batch, seq], got {tuple(ref_logits.shape)}, {tuple(logits.shape)}, {tuple(mask.shape)}"
        )
    keep = mask.bool()
    if not bool(keep.any()):
        raise SafegeomError("answer_kl got an empty mask: the batch has no answer tokens")
    dtype = torch.float64 if torch.float64 in (ref_logits.dtype, logits.dtype) else torch.float32
    ref_kept, cur_kept = ref_logits.detach()[keep].to(dtype), logits[keep].to(dtype)
    for x in (ref_kept, cur_kept):  # -inf (a masked-out token) is allowed, NaN and +inf are not
        if bool(torch.isnan(x).any()) or bool(torch.isposinf(x).any()):
            raise NonFiniteError("answer_kl: the logits contain NaN or inf")
    ref, cur = torch.log_softmax(ref_kept, dim=-1), torch.log_softmax(cur_kept, dim=-1)
    return token_kl(ref, cur).mean()


def token_kl(ref_logp: Float[Tensor, "*n vocab"], logp: Float[Tensor, "*n vocab"]) -> Tensor:
    """``KL(P_ref ‖ P_θ)`` per token from log-probabilities (nats; a token with ``P_ref = 0``
    contributes 0). Returns a tensor of shape ``*n``."""
    p_ref = ref_logp.exp()
    return torch.where(p_ref > 0, p_ref * (ref_logp - logp), torch.zeros_like(p_ref)).sum(-1)


def pooled_hidden(
    lm: LoadedModel,
    prompts: Prompts,
    *,
    layers: str | Sequence[int] = "all",
    site: str = "resid_post",
    batch_size: int = 32,
    system: str | None = None,
) -> Float[Tensor, "n d"]:
    """Hidden states at ``site`` mean-pooled over every prompt token, then averaged over ``layers``.

    "Every prompt token" is the whole chat-rendered prompt (template tokens included), never the
    left padding. Computed in float64 from one forward per batch, with hooks that always detach.

    Returns:
        ``[n, d_model]`` float64 features on CPU, in prompt order.
    """
    check(batch_size >= 1, "batch_size", "must be ≥ 1", batch_size)
    chosen = parse_layers(layers if isinstance(layers, str) else list(layers), lm.n_layers)
    encoded = encode_chat(lm, prompts, system)
    pad = lm.tokenizer.pad_token_id
    pad = int(pad if pad is not None else lm.tokenizer.eos_token_id)
    out = torch.zeros(len(encoded), lm.d_model, dtype=torch.float64)
    for chunk in longest_first([len(e) for e in encoded], batch_size):
        batch = collate_left([encoded[i] for i in chunk], pad).to(lm.device)
        weights = batch.attention_mask.to(torch.float64).unsqueeze(-1)  # [b, s, 1], 0 on padding
        sums: list[Tensor] = []

        def pool(h: Tensor, w: Tensor = weights, acc: list[Tensor] = sums) -> None:
            acc.append((h.detach().to(torch.float64) * w).sum(1) / w.sum(1))

        hooks = [Hook(*site_hook_point(lm, site, layer), fn=pool) for layer in chosen]
        with torch.inference_mode(), attach(hooks):
            lm.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            )
        out[chunk] = torch.stack(sums).mean(0).cpu()
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError("pooled hidden states contain NaN or inf: check the model's weights")
    return out


@runtime_checkable
class RiskCritic(Protocol):
    """Anything that scores prompts' risk: ``risk(lm, prompts)`` → ``[n]`` tensor in [1, 5]."""

    def risk(self, lm: LoadedModel, prompts: Prompts) -> Float[Tensor, " n"]:
        """One risk per prompt, 1 = harmless … 5 = harmful, for the reference model ``lm``."""
        ...


Scale = Literal["binary", "probability"]


@dataclass(frozen=True)
class RiskProbeConfig:
    """How the activation risk probe is trained and scored."""

    harmful: tuple[str, ...] = ("advbench:train", "jbb-harmful:train", "directharm4:train")
    """Harmful training prompt sets (combined, then sampled)."""
    harmless: tuple[str, ...] = ("alpaca:train",)
    """Harmless training prompt sets."""
    harmful_test: tuple[str, ...] = ("advbench:test", "jbb-harmful:test", "directharm4:test")
    """Held-out harmful prompt sets for the recorded AUROC."""
    harmless_test: tuple[str, ...] = ("alpaca:test",)
    """Held-out harmless prompt sets for the recorded AUROC."""
    n_per_class: int = 128
    """Training prompts per class (a deterministic sample)."""
    n_test_per_class: int = 64
    """Held-out prompts per class."""
    layers: str = "all"
    """Layers whose ``resid_post`` states are averaged (a layer spec: all, 2-3, -1, …)."""
    scale: Scale = "binary"
    """``binary``: §7's harmful ⇒ 5, else 1 (at probability ≥ 0.5); ``probability``: ``1 + 4p``
    (our proposal, a graded risk)."""
    C: float = 1.0
    """Inverse L2 strength of the logistic probe (on standardised features)."""
    seed: int = 0
    """Seed of the prompt samples and the solver."""
    batch_size: int = 32
    """Prompts per forward pass."""

    def __post_init__(self) -> None:
        for name in ("n_per_class", "n_test_per_class"):  # a probe needs 2 prompts per class
            check(getattr(self, name) >= 2, name, "must be ≥ 2", getattr(self, name))
        check(self.batch_size >= 1, "batch_size", "must be ≥ 1", self.batch_size)
        check(
            self.scale in ("binary", "probability"),
            "scale",
            "must be binary or probability",
            self.scale,
        )
        check(math.isfinite(self.C) and self.C > 0, "C", "must be a finite number > 0", self.C)
        for name in ("harmful", "harmless", "harmful_test", "harmless_test"):
            check(len(getattr(self, name)) > 0, name, "must name at least one prompt set")


def _sample(specs: Sequence[str], n: int, seed: int):
    pool = combine_prompts(list(specs))
    return pool.sample(min(n, len(pool)), seed=seed)


@dataclass(frozen=True)
class RiskProbe:
    """A fitted logistic risk probe on pooled reference-model hidden states (see :func:`fit_risk_probe`)."""

    weight: Tensor = field(repr=False)
    """``[d]`` float64 normal in activation coordinates: ``logit = weight · x + intercept``."""
    intercept: float
    layers: tuple[int, ...]
    """Layers averaged (``resid_post``)."""
    auroc: float
    """Held-out AUROC on the ``:test`` prompts, in [0, 1]."""
    accuracy: float
    """Held-out accuracy at probability 0.5, in [0, 1]."""
    scale: Scale = "binary"
    """How a probability becomes a risk, see :class:`RiskProbeConfig`."""
    provenance: Provenance = field(default_factory=Provenance, repr=False)

    def probability(self, lm: LoadedModel, prompts: Prompts) -> Float[Tensor, " n"]:
        """P(harmful) per prompt, float64 on CPU."""
        if lm.d_model != self.weight.shape[0]:
            raise SafegeomError(
                f"the risk probe was fitted on width {self.weight.shape[0]}, the model has "
                f"{lm.d_model}: fit it on the reference model"
            )
        x = pooled_hidden(lm, prompts, layers=list(self.layers))
        return torch.sigmoid(x @ self.weight + self.intercept)

    def risk(self, lm: LoadedModel, prompts: Prompts) -> Float[Tensor, " n"]:
        """Risk per prompt in [1, 5] (float32): 5/1 at p ≥ / < 0.5, or ``1 + 4p``."""
        p = self.probability(lm, prompts)
        r = 1.0 + 4.0 * p if self.scale == "probability" else torch.where(p >= 0.5, 5.0, 1.0)
        return r.to(torch.float32)

    def with_scale(self, scale: Scale) -> RiskProbe:
        """The same probe with another probability → risk mapping."""
        check(scale in ("binary", "probability"), "scale", "must be binary or probability", scale)
        return replace(self, scale=scale)

    def save(self, path: str | Path) -> Path:
        """Write the probe as safetensors with its metadata and provenance; returns the path."""
        meta: dict[str, Any] = {
            "kind": "risk_probe",
            "intercept": self.intercept,
            "layers": list(self.layers),
            "auroc": self.auroc,
            "accuracy": self.accuracy,
            "scale": self.scale,
            "provenance": self.provenance.to_dict(),
        }
        return save_safetensors(path, {"weight": self.weight}, meta)

    @classmethod
    def load(cls, path: str | Path) -> RiskProbe:
        """Read a probe written by :meth:`save`.

        Raises:
            NotFoundError: no file; ArtifactError: not a saved risk probe.
        """
        tensors, meta = read_safetensors(path, what="risk probe")
        if meta.get("kind") != "risk_probe" or "weight" not in tensors:
            raise ArtifactError(f"{path} is not a saved risk probe (kind {meta.get('kind')!r})")
        return cls(
            tensors["weight"].double(),
            float(meta["intercept"]),
            tuple(meta["layers"]),
            float(meta["auroc"]),
            float(meta["accuracy"]),
            meta["scale"],
            Provenance.from_dict(meta["provenance"]),
        )


def fit_risk_probe(lm: LoadedModel, config: RiskProbeConfig | None = None) -> RiskProbe:
    """Fit §7's activation risk predictor on the reference model ``lm``.

    Features: :func:`pooled_hidden` (``resid_post`` over ``config.layers``); a standardised
    logistic probe (:func:`~safegeom.carriers.probes.fit_probe`) on the harmful vs harmless
    ``:train`` samples, scored on the ``:test`` samples (AUROC and accuracy recorded).

    Returns:
        The :class:`RiskProbe`, with provenance (model, weight hash, prompt sets, config).
    """
    config = config or RiskProbeConfig()
    layers = parse_layers(config.layers, lm.n_layers)
    sets = [
        _sample(config.harmful, config.n_per_class, config.seed),
        _sample(config.harmless, config.n_per_class, config.seed),
        _sample(config.harmful_test, config.n_test_per_class, config.seed),
        _sample(config.harmless_test, config.n_test_per_class, config.seed),
    ]
    feats = [pooled_hidden(lm, s, layers=list(layers), batch_size=config.batch_size) for s in sets]
    y = np.concatenate(
        [np.full(len(s), label) for s, label in zip(sets, (1, 0, 1, 0), strict=True)]
    )
    n_train = len(sets[0]) + len(sets[1])
    split = (np.arange(n_train), np.arange(n_train, len(y)))
    fit = fit_probe(torch.cat(feats), y, C=config.C, seed=config.seed, split=split)
    weight = torch.as_tensor(fit.weight, dtype=torch.float64)
    auroc = float(fit.auroc)
    prov = Provenance(
        model=lm.name,
        weight_hash=lm.weight_hash,
        prompt_sets={s.name: s.content_hash for s in sets},
        config=config_dict(config),
        extra={
            "site": "resid_post",
            "layers": list(layers),
            "n_train": fit.n_train,
            "n_test": fit.n_test,
            "auroc": auroc,
        },
    )
    return RiskProbe(weight, fit.intercept, layers, auroc, fit.accuracy, config.scale, prov)


@dataclass(frozen=True)
class JudgeCritic:
    """Risk from a judge on the reference model's own completion (our proposal).

    The reference model (``lm``: pass the frozen reference) answers each prompt greedily; the
    judge decides whether that answer refused. A refused prompt is one the aligned model treats
    as harmful, so it gets ``refused_risk`` (5), else ``complied_risk`` (1). Any
    :class:`~safegeom.judges.Judge` plugs in (substring, XSTest, a model judge).
    """

    judge: Judge
    """The judge: ``judge(prompts, completions)`` → one bool per pair, True = refused."""
    max_new_tokens: int = 24
    """Tokens generated per completion."""
    refused_risk: float = 5.0
    """Risk of a prompt the reference model refuses."""
    complied_risk: float = 1.0
    """Risk of a prompt it answers."""

    def __post_init__(self) -> None:
        if not isinstance(self.judge, Judge):
            raise ConfigError(
                f"JudgeCritic needs a safegeom Judge (a callable judge(prompts, completions) with a "
                f"name, e.g. get_judge('substring')), got {type(self.judge).__name__}"
            )
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be ≥ 1", self.max_new_tokens)
        for name in ("refused_risk", "complied_risk"):
            value = getattr(self, name)
            check(
                isinstance(value, (int, float)) and RISK_MIN <= value <= RISK_MAX,
                name,
                "must lie in [1, 5]",
                value,
            )

    def risk(self, lm: LoadedModel, prompts: Prompts) -> Float[Tensor, " n"]:
        """One risk per prompt (float32): ``refused_risk`` where the reference refused."""
        texts = load_prompts(prompts).prompts
        completions = generate(lm, texts, max_new_tokens=self.max_new_tokens, progress=False)
        refused = self.judge(texts, completions)
        return torch.tensor(
            [self.refused_risk if r else self.complied_risk for r in refused], dtype=torch.float32
        )
