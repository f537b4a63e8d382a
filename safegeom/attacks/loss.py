"""Target losses of adversarial candidates: the prompt prefix's KV cache computed once.

Every candidate of a step shares the tokens before the adversarial string (template start,
system prompt, behaviour), so :func:`prefix_cache` runs them once and :func:`candidate_losses`
feeds only ``candidate + after + target`` for the whole batch, on copies of that cache expanded
to the batch (views: no memory per candidate). :func:`uncached_losses` is the plain full-sequence
computation the cached one must equal (tested within float32 tolerance).

The loss is the mean cross-entropy (nats per token) of the target tokens, teacher-forced after
the assistant header, as in Zou et al. (2023).

Example (not a doctest: it needs a loaded model ``lm``)::

    prefix = prefix_cache(lm.model, slot.before_ids)
    losses, hits = candidate_losses(lm.model, prefix, candidates, slot.tail(), len(slot.target_ids))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformers import DynamicCache

from safegeom.generation import check_finite
from safegeom.models.chat import EncodedPrompt, collate_left

__all__ = [
    "PrefixCache",
    "candidate_losses",
    "prefix_cache",
    "sequence_losses",
    "token_gradient",
    "uncached_losses",
]


def _cache_keyword(model: nn.Module) -> str:
    """The forward's KV-cache keyword: ``cache`` (transformers ≥ 5.2x) or ``past_key_values``."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class PrefixCache:
    """The keys and values of a prompt prefix (batch 1), per layer, reused by every candidate."""

    keys: tuple[Tensor, ...]
    """Per layer ``[1, heads, prefix, head_dim]``."""
    values: tuple[Tensor, ...]
    """Per layer, as ``keys``."""
    length: int
    """Number of prefix tokens."""

    def expanded(self, batch: int, config: object) -> DynamicCache:
        """A fresh cache holding the prefix for ``batch`` rows (expanded views; the forward
        appends to the copy, never to these tensors)."""
        data = [
            (k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
            for k, v in zip(self.keys, self.values, strict=True)
        ]
        return DynamicCache(data, config=config)


@torch.no_grad()
def prefix_cache(model: nn.Module, ids: Sequence[int]) -> PrefixCache:
    """Run the prefix ``ids`` once and keep its KV cache.

    Returns:
        A :class:`PrefixCache` of ``len(ids)`` tokens.
    """
    device = model.get_input_embeddings().weight.device
    keyword = _cache_keyword(model)
    out = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=True)
    layers = (out[keyword] if keyword in out else out["past_key_values"]).layers
    return PrefixCache(
        keys=tuple(layer.keys for layer in layers),
        values=tuple(layer.values for layer in layers),
        length=len(ids),
    )


def _target_loss(
    logits: Float[Tensor, "b k vocab"], targets: Int[Tensor, " t"]
) -> tuple[Float[Tensor, " b"], Bool[Tensor, " b"]]:
    """Mean target cross-entropy per row from the last ``t + 1`` positions' logits, and whether
    the target is the greedy continuation of each row."""
    pred = logits[:, :-1].float()
    check_finite(pred, "attack logits")
    tgt = targets.to(pred.device)[None].expand(pred.shape[0], -1)
    loss = F.cross_entropy(pred.transpose(1, 2), tgt, reduction="none").mean(-1)
    return loss, (pred.argmax(-1) == tgt).all(-1)


@torch.no_grad()
def candidate_losses(
    model: nn.Module,
    prefix: PrefixCache,
    candidates: Int[Tensor, "b n"],
    tail: Int[Tensor, " tail"],
    n_target: int,
    *,
    batch_size: int | None = None,
) -> tuple[Float[Tensor, " b"], Bool[Tensor, " b"]]:
    """Target loss of every candidate, the prefix's cache reused.

    Args:
        candidates: adversarial token rows.
        tail: ``after + target`` ids (:meth:`~safegeom.attacks.slots.AttackSlot.tail`).
        n_target: how many of ``tail``'s last ids are the target.
        batch_size: candidates per forward (default: all at once).

    Returns:
        ``(loss, hit)``: float32 CPU mean cross-entropy per candidate (nats per target token),
        and whether the target is its greedy continuation.
    """
    device = model.get_input_embeddings().weight.device
    size = batch_size or candidates.shape[0]
    keyword = _cache_keyword(model)
    losses, hits = [], []
    for chunk in candidates.split(size):
        b = chunk.shape[0]
        ids = torch.cat([chunk, tail[None].expand(b, -1)], dim=1).to(device)
        pos = torch.arange(prefix.length, prefix.length + ids.shape[1], device=device)
        out = model(
            input_ids=ids,
            position_ids=pos[None].expand(b, -1),
            use_cache=True,
            logits_to_keep=n_target + 1,
            **{keyword: prefix.expanded(b, model.config)},
        )
        loss, hit = _target_loss(out.logits, tail[-n_target:])
        losses.append(loss.cpu())
        hits.append(hit.cpu())
    return torch.cat(losses), torch.cat(hits)


@torch.no_grad()
def uncached_losses(
    model: nn.Module,
    before: Sequence[int],
    candidates: Int[Tensor, "b n"],
    tail: Int[Tensor, " tail"],
    n_target: int,
) -> tuple[Float[Tensor, " b"], Bool[Tensor, " b"]]:
    """:func:`candidate_losses` by full forwards of ``before + candidate + tail`` (the reference
    the cached computation is tested against)."""
    device = model.get_input_embeddings().weight.device
    b = candidates.shape[0]
    head = torch.tensor([list(before)], dtype=torch.long).expand(b, -1)
    ids = torch.cat([head, candidates, tail[None].expand(b, -1)], dim=1).to(device)
    out = model(input_ids=ids, use_cache=False, logits_to_keep=n_target + 1)
    loss, hit = _target_loss(out.logits, tail[-n_target:])
    return loss.cpu(), hit.cpu()


def token_gradient(
    model: nn.Module,
    prefix: PrefixCache,
    opt: Int[Tensor, " n"],
    tail: Int[Tensor, " tail"],
    n_target: int,
) -> Float[Tensor, "n vocab"]:
    """Gradient of the target loss w.r.t. the one-hot adversarial tokens (Zou et al. 2023).

    Returns:
        float32 CPU tensor ``[n, vocab]``: a large negative entry is a token whose swap in
        should lower the loss most, to first order.
    """
    embed = model.get_input_embeddings()
    weight = embed.weight
    with torch.enable_grad():
        one_hot = torch.zeros(
            opt.shape[0], weight.shape[0], dtype=weight.dtype, device=weight.device
        )
        one_hot.scatter_(1, opt.to(weight.device)[:, None], 1.0)
        one_hot.requires_grad_(True)
        embeds = torch.cat([one_hot @ weight, embed(tail.to(weight.device))], dim=0)[None]
        pos = torch.arange(prefix.length, prefix.length + embeds.shape[1], device=weight.device)
        out = model(
            inputs_embeds=embeds,
            position_ids=pos[None],
            use_cache=True,
            logits_to_keep=n_target + 1,
            **{_cache_keyword(model): prefix.expanded(1, model.config)},
        )
        loss, _ = _target_loss(out.logits, tail[-n_target:])
        (grad,) = torch.autograd.grad(loss.sum(), one_hot)
    return grad.float().cpu()


@torch.no_grad()
def sequence_losses(
    model: nn.Module,
    pad_id: int,
    prompts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
) -> tuple[Float[Tensor, " n"], Bool[Tensor, " n"]]:
    """Mean target cross-entropy of ``prompt + target`` sequences of any lengths (left-padded
    batches; positions from the mask), for attacks whose prompts differ in length.

    Returns:
        ``(loss, hit)``: float32 CPU tensor ``[n]`` in nats per target token, and whether each
        target is the greedy continuation of its prompt.
    """
    device = model.get_input_embeddings().weight.device
    out = torch.empty(len(prompts), dtype=torch.float32)
    hits = torch.zeros(len(prompts), dtype=torch.bool)
    for start in range(0, len(prompts), batch_size):
        rows = range(start, min(start + batch_size, len(prompts)))
        seqs = [EncodedPrompt((*prompts[i], *targets[i]), 0, 0) for i in rows]
        batch = collate_left(seqs, pad_id).to(device)
        k = max(len(targets[i]) for i in rows)
        logits = (
            model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
                logits_to_keep=k + 1,
            )
            .logits[:, :-1]
            .float()
        )
        check_finite(logits, "attack logits")
        for row, i in enumerate(rows):
            t = len(targets[i])
            tgt = torch.tensor(list(targets[i]), device=device)
            out[i] = F.cross_entropy(logits[row, k - t :], tgt).cpu()
            hits[i] = bool((logits[row, k - t :].argmax(-1) == tgt).all())
    return out, hits
