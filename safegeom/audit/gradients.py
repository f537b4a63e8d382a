"""Per-example gradients of the task loss and of the refusal score, as Gram matrices, for the
interference rows (:mod:`~safegeom.audit.interference`).

Two spaces (docs/methods.md §14, our proposal; RefusalGuard names interference between task
optimisation and safety features as a mechanism but publishes no measure of it):

- the residual stream at one layer: the gradient w.r.t. a vector ``δ`` added to ``resid_pre`` of
  that layer at every token position (one ``δ`` per example, so one backward gives every
  example's own gradient), so both losses are differentiated w.r.t. the same ``d``-dimensional
  perturbation however long their sequences are;
- the weights: every linear projection inside the decoder blocks (:func:`block_weights`; the
  modules LoRA adapts by default, and the space a LoRA update ``ΔW = BA`` lives in). For a PEFT
  adapter loaded unmerged, the base layer's weight: its gradient is the gradient w.r.t. the
  effective weight ``W + s·BA``.

All examples (task examples and harmful prompts) go through one right-padded forward and one
backward of the sum of their losses (examples do not interact, so each example's gradient is
that of its own loss). A linear layer's per-example weight gradient is ``Σ_t g_t a_tᵀ`` (output
gradient times input, over the example's tokens), formed a block of output rows at a time from
the layer's input and output gradient (read by hooks held in a context manager) and folded into
the Gram matrix of all examples' gradients at once, in float64: the weight gradients are never
stored whole. Every cosine between sums of these gradients, and its bootstrap, is a function of
the Gram matrix.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from safegeom.errors import SafegeomError
from safegeom.evaluation import refusal_log_odds, refusal_token_ids
from safegeom.generation import encode_chat
from safegeom.hooks import Hook, attach
from safegeom.models.loading import LoadedModel
from safegeom.prompts import PromptSet
from safegeom.training.data import IGNORE_INDEX, encode_examples

__all__ = ["CHUNK", "Gradients", "block_linears", "example_gradients", "weight_gram"]

CHUNK = 1 << 22
"""Most elements of one block of per-example weight gradients (float32) held at a time."""


@dataclass(frozen=True)
class Gradients:
    """The per-example gradients of ``n_task`` task losses then ``n - n_task`` refusal scores
    (float64, on the CPU)."""

    resid: Float[Tensor, "n d"]
    """Gradient w.r.t. the vector added to the residual stream at the layer, per example."""
    weights: Float[Tensor, "n n"]
    """Gram matrix of the per-example gradients w.r.t. the decoder blocks' linear weights."""
    n_task: int
    """How many of the examples (the first ones) are task examples."""
    n_weights: int
    """How many weights those gradients have (the dimension of the weight space)."""

    @property
    def n(self) -> int:
        """The number of examples."""
        return int(self.resid.shape[0])


def block_linears(lm: LoadedModel) -> list[nn.Module]:
    """Every linear projection inside the decoder blocks, in module order (a PEFT adapter's own
    ``lora_*`` matrices left out, its base layers kept).

    Raises:
        SafegeomError: the blocks hold no linear projection.
    """
    from transformers.pytorch_utils import Conv1D

    found: list[nn.Module] = []
    for block in lm.blocks:
        for name, module in block.named_modules():
            if "lora_" not in name and isinstance(module, (nn.Linear, Conv1D)):
                found.append(module)
    if not found:
        raise SafegeomError(f"no linear projection in the decoder blocks of {lm.name}")
    return found


def weight_gram(
    inputs: Float[Tensor, "b t i"], grads: Float[Tensor, "b t o"]
) -> Float[Tensor, "b b"]:
    """Gram matrix of the per-example gradients ``Σ_t g_t a_tᵀ`` of one linear layer's weight,
    formed :data:`CHUNK` elements at a time (float32 products, summed over blocks in float64).

    Returns:
        ``[b, b]`` inner products of the examples' weight gradients.

    Example:
        >>> a, g = torch.randn(3, 5, 4), torch.randn(3, 5, 2)
        >>> full = torch.einsum("bto,bti->boi", g, a).reshape(3, -1).double()
        >>> bool(torch.allclose(weight_gram(a, g), full @ full.T, rtol=1e-5))
        True
    """
    b, _, i = inputs.shape
    rows = max(1, CHUNK // max(1, b * i))
    gram = torch.zeros(b, b, dtype=torch.float64)
    a = inputs.float()
    for start in range(0, grads.shape[-1], rows):
        block = torch.einsum("bto,bti->boi", grads[..., start : start + rows].float(), a)
        flat = block.reshape(b, -1)
        gram += (flat @ flat.T).double().cpu()  # float32 products, float64 sums of blocks
    return gram


@contextmanager
def _gradient_hooks(modules: Sequence[nn.Module], gram: list[Tensor]) -> Iterator[None]:
    """While open, every forward of ``modules`` adds its per-example weight-gradient Gram matrix
    to ``gram[0]`` once the backward reaches it; weights set to require gradients, restored (and
    the hooks removed) afterwards, even when the body raises."""
    before = [m.weight.requires_grad for m in modules]

    def forward_hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        if not output.requires_grad:
            return
        inputs = args[0].detach()
        output.register_hook(lambda g: gram.__setitem__(0, gram[0] + weight_gram(inputs, g)))

    handles = []
    try:
        for m in modules:
            m.weight.requires_grad_(True)
            handles.append(m.register_forward_hook(forward_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in zip(modules, before, strict=True):
            m.weight.requires_grad_(flag)


def _batch(
    lm: LoadedModel, seqs: Sequence[Sequence[int]], labels: Sequence[Sequence[int] | None]
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``(input_ids, attention_mask, labels)`` (label -100 on padding, prompts and
    the refusal prompts)."""
    width = max(len(s) for s in seqs)
    pad = lm.tokenizer.pad_token_id
    pad = int(pad if pad is not None else lm.tokenizer.eos_token_id)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    target = torch.full_like(ids, IGNORE_INDEX)
    for row, (seq, lab) in enumerate(zip(seqs, labels, strict=True)):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        if lab is not None:
            target[row, : len(seq)] = torch.tensor(lab)
    return ids.to(lm.device), mask.to(lm.device), target.to(lm.device)


def _losses(
    logits: Tensor, target: Tensor, lengths: Sequence[int], n_task: int, tokens: Tensor
) -> Tensor:
    """Each task example's mean response cross-entropy, then each prompt's refusal score."""
    task = nn.functional.cross_entropy(
        logits[:n_task, :-1].float().transpose(1, 2), target[:n_task, 1:], reduction="none"
    )
    counts = (target[:n_task, 1:] != IGNORE_INDEX).sum(1)
    last = torch.tensor([n - 1 for n in lengths[n_task:]], device=logits.device)
    rows = torch.arange(n_task, logits.shape[0], device=logits.device)
    score = refusal_log_odds(logits[rows, last], tokens)
    return torch.cat([task.sum(1) / counts, score.to(task.dtype)])


def example_gradients(
    lm: LoadedModel,
    layer: int,
    task: tuple[Sequence[str], Sequence[str]],
    prompts: PromptSet,
    *,
    system: str | None = None,
) -> Gradients:
    """Per-example gradients of the task loss (``task``: prompts and responses; mean
    cross-entropy of each example's response tokens, nats) and of the refusal score of each of
    ``prompts`` (nats), w.r.t. the residual stream at ``layer`` and the decoder blocks' linear
    weights, from one forward and one backward (module docstring).

    Returns:
        :class:`Gradients`: the task examples first, then the prompts.

    Raises:
        SafegeomError: no task example or no prompt; a task example without response tokens.
    """
    examples = encode_examples(lm.tokenizer, *task, system=system)
    encoded = encode_chat(lm, prompts, system)
    if not examples or not encoded:
        raise SafegeomError("interference needs task examples and harmful prompts; pass both")
    seqs = [e.input_ids for e in examples] + [e.input_ids for e in encoded]
    labels = [e.labels for e in examples] + [None] * len(encoded)
    ids, mask, target = _batch(lm, seqs, labels)
    if bool(((target[: len(examples), 1:] != IGNORE_INDEX).sum(1) == 0).any()):
        raise SafegeomError("a task example has no response token; give every prompt a response")
    delta = torch.zeros(len(seqs), 1, lm.d_model, device=lm.device, requires_grad=True)
    modules = block_linears(lm)
    gram = [torch.zeros(len(seqs), len(seqs), dtype=torch.float64)]

    def add(hidden: Tensor) -> Tensor:
        return hidden + delta.to(hidden.dtype)

    was_training = lm.model.training
    lm.model.eval()
    try:
        with torch.enable_grad(), _gradient_hooks(modules, gram):
            with attach([Hook(lm.blocks[layer], "pre", add)]):
                logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            losses = _losses(
                logits, target, [len(s) for s in seqs], len(examples), refusal_token_ids(lm)
            )
            weights = [m.weight for m in modules]
            (resid, *_) = torch.autograd.grad(losses.sum(), [delta, *weights])
    finally:
        lm.model.train(was_training)
    return Gradients(
        resid=resid[:, 0].detach().double().cpu(),
        weights=gram[0],
        n_task=len(examples),
        n_weights=sum(w.numel() for w in weights),
    )
