"""KL-regularised LoRA (``kl``) and adaptive regularisation (``adaptive``, docs/methods.md §7).

Both train LoRA adapters and keep the reference policy for free: the reference is the same model
with its adapters disabled (``peft``'s ``disable_adapter``), i.e. the frozen initial model, so no
second copy is held. Per step, one extra forward without gradients gives the reference logits.

- ``kl``: ``loss = L_SFT + kl_weight · KL(P_ref ‖ P_θ)`` over answer tokens (a constant weight);
  with ``kl_examples="harmless"`` the KL of the examples the task marks harmful is left out (they
  get the cross-entropy alone).
- ``adaptive``: each training example gets a risk ``r ∈ [1, 5]`` from a critic on the *frozen*
  reference, computed once before training (the reference never changes, so per-step scoring
  would give the same numbers); then ``sft_w``, ``kl_w`` as §7 and
  ``loss = mean_i (sft_w_i · L_i + kl_w_i · KL_i)`` with ``risk_unit="example"`` (our proposal:
  mixed batches weight each example by its own risk), or §7's per-batch form with the batch's
  mean risk (``risk_unit="batch"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from safegeom.config import check
from safegeom.errors import ConfigError
from safegeom.judges import Judge
from safegeom.training.adaptive import RiskCritic, adaptive_weights, token_kl
from safegeom.training.data import IGNORE_INDEX

__all__ = ["RegConfig", "per_example_terms", "regularised_loss"]


@dataclass(frozen=True)
class RegConfig:
    """Settings of the ``kl`` and ``adaptive`` trainers (``safegeom train kl|adaptive``)."""

    kl_weight: float = 1.0
    """Constant weight β of KL(P_ref ‖ P_θ) (kl only)."""
    kl_examples: Literal["all", "harmless"] = "all"
    """Examples whose answers carry the KL term (kl only): all, or only those the task marks
    harmless (a JSONL ``kind``; the harmful ones get the cross-entropy alone). The KL is still a
    mean over the batch's answered examples, harmful ones counting 0, so β weighs each harmless
    example as with all."""
    critic: Literal["probe", "judge"] | RiskCritic = "probe"
    """Risk critic (adaptive): the activation probe of §7, or a judge on the reference's answers
    (in Python also a RiskCritic object, used as it is)."""
    judge: str = "substring"
    """Judge of the judge critic: substring, xstest, hf-classifier:PATH, chat-judge:PATH."""
    risk_unit: Literal["example", "batch"] = "example"
    """Weights per example (our proposal) or per batch from its mean risk (§7 as written)."""
    probe_scale: Literal["binary", "probability"] = "binary"
    """Probe risk: harmful ⇒ 5 else 1 (§7), or 1 + 4·P(harmful) (our proposal)."""
    probe_layers: str = "all"
    """Layers whose pooled hidden states feed the probe (a layer spec: all, 2:6 end-exclusive, 2-5
    inclusive, 1,3)."""
    probe_n: int = 128
    """Training prompts per class of the probe."""

    def __post_init__(self) -> None:
        """Check every range.

        Raises:
            ConfigError: a value out of range; the message names the field and its flag.
        """
        beta = self.kl_weight
        check(math.isfinite(beta) and beta >= 0, "kl_weight", "must be 0 or more", beta)
        check(
            self.kl_examples in ("all", "harmless"),
            "kl_examples",
            "must be all or harmless",
            self.kl_examples,
        )
        if isinstance(self.critic, str):
            critic = self.critic
            check(critic in ("probe", "judge"), "critic", "must be probe or judge", critic)
        elif not isinstance(self.critic, RiskCritic) or isinstance(self.critic, Judge):
            raise ConfigError(
                "critic must be a RiskCritic (RiskProbe, JudgeCritic(judge) or any object with "
                f"risk(lm, prompts)), got {type(self.critic).__name__}; wrap a judge as "
                "JudgeCritic(judge)"
            )
        check(
            self.risk_unit in ("example", "batch"),
            "risk_unit",
            "must be example or batch",
            self.risk_unit,
        )
        check(
            self.probe_scale in ("binary", "probability"),
            "probe_scale",
            "must be binary or probability",
            self.probe_scale,
        )
        check(self.probe_n >= 2, "probe_n", "must be at least 2", self.probe_n)


def per_example_terms(
    logits: Float[Tensor, "batch seq vocab"],
    ref_logits: Float[Tensor, "batch seq vocab"] | None,
    labels: Int[Tensor, "batch seq"],
) -> tuple[Float[Tensor, " batch"], Float[Tensor, " batch"] | None]:
    """Per example: the mean answer-token cross-entropy and KL(P_ref ‖ P_θ), in nats.

    Labels are the training labels (``-100`` off the answer); the causal shift is done here.
    Rows without an answer token get 0 for both.
    """
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    count = keep.sum(-1).clamp(min=1)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    safe = target.clamp(min=0)
    nll = -logp.gather(-1, safe[..., None])[..., 0]
    ce = (nll * keep).sum(-1) / count
    if ref_logits is None:
        return ce, None
    ref = torch.log_softmax(ref_logits[:, :-1].detach().float(), dim=-1)
    kl_tok = token_kl(ref, logp)
    return ce, (kl_tok * keep).sum(-1) / count


def regularised_loss(
    ce: Float[Tensor, " batch"],
    kl: Float[Tensor, " batch"],
    answered: Tensor,
    *,
    risk: Float[Tensor, " batch"] | None,
    kl_weight: float = 1.0,
    risk_unit: Literal["example", "batch"] = "example",
    total: int | None = None,
    batch_risk: Tensor | None = None,
    world: int = 1,
    kl_rows: Tensor | None = None,
) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """The step loss and its terms: constant-β KL (``risk`` None) or §7's adaptive mix.

    ``kl_rows`` (constant β only) marks the rows whose KL counts (``None``: every row). The KL is
    then ``Σ_{answered, marked} KL_i / n`` with ``n`` the answered rows of the whole batch, not the
    marked ones: each marked example weighs exactly as it would with every row counting, whatever
    the mix of the batch (a harmless example in a mostly harmful batch is not pulled harder), so β
    means the same as without ``kl_rows``.

    ``answered`` marks the rows with answer tokens (the means are over those rows). For one
    rank's share of a batch cut over ``world`` ranks (:mod:`safegeom.parallel.ddp`): ``total``
    is the whole batch's answered rows (the means' divisor) and ``batch_risk`` its mean risk
    (``risk_unit="batch"``); the terms that are one number for the whole batch (``risk``,
    ``sft_w``, ``kl_w`` of the batch unit) are then given as that number ``/ world``, so every
    loss and term adds up over the ranks to the whole batch's.

    Returns:
        ``(loss, terms)`` with terms ``task``, ``kl`` (and ``risk``, ``sft_w``, ``kl_w``: means
        over the batch's rows), each a detached scalar tensor.
    """
    w = answered.to(ce.dtype)
    n = (
        w.sum().clamp(min=1)
        if total is None
        else torch.tensor(float(max(total, 1)), device=w.device)
    )
    if kl_rows is not None:
        if risk is not None:
            raise ConfigError("kl_rows selects the rows of the constant-weight KL only")
        kl = kl * kl_rows.to(kl.device, kl.dtype)
    ce_mean, kl_mean = (ce * w).sum() / n, (kl * w).sum() / n
    terms = {"task": ce_mean.detach(), "kl": kl_mean.detach()}
    if risk is None:
        return ce_mean + kl_weight * kl_mean, terms
    risk = risk.to(ce.device, ce.dtype)
    if risk_unit == "batch":
        mean_risk = (risk * w).sum() / n if batch_risk is None else batch_risk.to(ce.device)
        sft_w, kl_w = adaptive_weights(mean_risk)
        loss = sft_w * ce_mean + kl_w * kl_mean
        mean_risk, sft_w, kl_w = mean_risk / world, sft_w / world, kl_w / world
    else:
        sft_w, kl_w = adaptive_weights(risk)
        loss = ((sft_w * ce + kl_w * kl) * w).sum() / n
        mean_risk = (risk * w).sum() / n
    terms |= {
        "risk": mean_risk.detach(),
        "sft_w": ((sft_w * w).sum() / n if sft_w.dim() else sft_w).detach(),
        "kl_w": ((kl_w * w).sum() / n if kl_w.dim() else kl_w).detach(),
    }
    return loss, terms
