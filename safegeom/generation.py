"""Generation engine: batched greedy decoding and batched forward passes over chat prompts.

:func:`generate` decodes chat-formatted prompts greedily with a KV cache (its own loop rather than
``model.generate``, so no saved sampling setting of a checkpoint leaks in), using the library's
tokenization, left padding and position ids; it stops at EOS or the template's end-of-turn token.
Prompts are processed longest first to cut padding; results come back in input order.

``intervention`` (everywhere): an intervention value (:class:`~safegeom.interventions.Ablation`,
``Addition``, ``AffineEdit``; bound to the model here), one already bound
(``Ablation(c).on(lm)``), or any context manager entered around the model calls, or a
zero-argument callable returning one. :func:`describe_intervention` records it in provenance.

Token ids go to the input embedding's device; with a device map (``load_model(...,
LoadConfig(device_map=...))``) accelerate moves the hidden states from block to block and the logits back.

Logits are checked: NaN or inf (a NaN model, an overflowing addition coefficient) raises
:class:`~safegeom.errors.NonFiniteError` instead of being decoded or scored.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from safegeom.batching import auto_batch_size, longest_first
from safegeom.errors import ConfigError, NonFiniteError
from safegeom.models.chat import (
    ChatBatch,
    EncodedPrompt,
    EncodedSet,
    collate_left,
    encode_set,
    is_pre_encoded,
)
from safegeom.models.loading import LoadedModel
from safegeom.models.placement import input_device
from safegeom.prompts import Prompts, load_prompts

__all__ = [
    "ForwardCounter",
    "Intervention",
    "as_context",
    "check_finite",
    "describe_intervention",
    "end_of_turn_id",
    "generate",
    "generate_from_ids",
    "generation_batch_size",
    "last_position_logprobs",
    "stop_token_ids",
]

Intervention = AbstractContextManager[Any] | Callable[[], AbstractContextManager[Any]] | None
"""A context manager entered around the model calls, or a zero-argument factory of one."""


def _is_value(intervention: Any) -> bool:
    """An unbound intervention value: it has ``on(lm)``, ``context(lm)`` and ``to_dict()``."""
    return all(callable(getattr(intervention, a, None)) for a in ("on", "context", "to_dict"))


def as_context(
    intervention: Intervention, lm: LoadedModel | None = None
) -> AbstractContextManager[Any]:
    """The context manager to enter around the model calls for ``intervention``.

    An unbound intervention value is bound to ``lm`` (``value.on(lm)``); ``None`` gives a no-op.

    Raises:
        TypeError: not a context manager, a factory of one, or an intervention value.
        ConfigError: an unbound intervention value and no ``lm`` to bind it to.
    """
    if intervention is None:
        return contextlib.nullcontext()
    if _is_value(intervention):
        if lm is None:
            raise ConfigError(
                f"{type(intervention).__name__} is not bound to a model: pass .on(lm)"
            )
        return intervention.on(lm)  # type: ignore[union-attr]
    if hasattr(intervention, "__enter__") and hasattr(intervention, "__exit__"):
        return intervention  # type: ignore[return-value]
    if callable(intervention):
        made = intervention()
        if hasattr(made, "__enter__") and hasattr(made, "__exit__"):
            return made
    raise TypeError("intervention must be a context manager or a callable returning one")


def describe_intervention(intervention: Intervention) -> dict[str, Any] | None:
    """What an intervention does, for provenance (JSON-ready).

    Returns:
        ``None`` for no intervention; the value's ``to_dict()`` for an intervention value or a
        bound handle; ``{"kind": "custom", "repr": ...}`` for any other context manager or callable
        (its ``name``, its qualified name, or its type's qualified name: stable across runs).
    """
    if intervention is None:
        return None
    to_dict = getattr(intervention, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    name = getattr(intervention, "name", None) or getattr(intervention, "__qualname__", None)
    return {"kind": "custom", "repr": str(name or type(intervention).__qualname__)}


def check_finite(values: Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` when ``values`` holds NaN or inf."""
    if not bool(torch.isfinite(values).all()):
        kind = "NaN" if bool(torch.isnan(values).any()) else "inf"
        raise NonFiniteError(
            f"{what} contain {kind}: the model's weights or the intervention (an addition "
            "coefficient that overflows, --coeff nan) make the forward pass non-finite"
        )


def encode_chat(
    lm: LoadedModel, prompts: Prompts | EncodedSet, system: str | None
) -> list[EncodedPrompt]:
    """``prompts`` encoded for ``lm`` (an EncodedSet or attack set by its own ids); too long: refused."""
    keep = isinstance(prompts, EncodedSet) or is_pre_encoded(prompts)
    encoded = encode_set(
        lm.tokenizer,
        prompts if keep else load_prompts(prompts).prompts,
        system=system,
        chat_template=lm.chat_template,
        max_positions=lm.max_positions,
    )
    return list(encoded.encoded)


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int) -> ChatBatch:
    """Left-pad token sequences with the library's collation (positions from the mask)."""
    return collate_left([EncodedPrompt(tuple(s), len(s) - 1, 0) for s in seqs], pad_id)


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)


def _device(model: nn.Module) -> torch.device:
    """Where token ids go: the input embedding's device (a device map may put the rest elsewhere)."""
    return input_device(model)


def _cache_argument(model: nn.Module) -> str:
    """The KV-cache keyword of the forward: ``cache`` (transformers ≥ 5.2x) or ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _accepts_keep(model: nn.Module) -> bool:
    """Whether the forward takes ``logits_to_keep`` (transformers 5.x causal LMs do)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def generation_batch_size(model: nn.Module, max_len: int, batch_size: int | None) -> int:
    """Prompts per batch (:func:`safegeom.batching.auto_batch_size`, rough bytes per token on
    CUDA: MLP activations plus the KV cache)."""
    cfg = model.config
    d, layers = int(cfg.hidden_size), int(getattr(cfg, "num_hidden_layers", 32))
    per_token = (getattr(cfg, "intermediate_size", 4 * d) * 3 + 2 * layers * d) * 4
    return auto_batch_size(
        _device(model), max_len, per_token * max_len, gpu_cap=256, batch_size=batch_size
    )


def end_of_turn_id(tokenizer: Any, chat_template: str | None = None) -> int | None:
    """The token the chat template writes right after an assistant message, if it is a special
    (added) token such as ``<|eot_id|>``, ``<|im_end|>`` or ``<end_of_turn>``; else ``None``."""
    marker = "SAFEGEOMTURNMARKER"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            chat_template=chat_template,
            tokenize=False,
        )
    except Exception:  # templates may reject this conversation shape
        return None
    tail = text[text.find(marker) + len(marker) :] if marker in text else ""
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return int(ids[0]) if ids and ids[0] in special else None


def stop_token_ids(
    tokenizer: Any, model: nn.Module | None = None, chat_template: str | None = None
) -> tuple[int, ...]:
    """Token ids that end a completion: the tokenizer's EOS, the model's generation-config EOS
    (an int or a list) and the template's end-of-turn token (:func:`end_of_turn_id`)."""
    ids: list[int] = []
    eos_cfg = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, eos_cfg, end_of_turn_id(tokenizer, chat_template)):
        if value is not None:
            ids.extend([value] if isinstance(value, int) else list(value))
    return tuple(dict.fromkeys(int(i) for i in ids))


@torch.inference_mode()
def _greedy(
    model: nn.Module, batch: ChatBatch, max_new_tokens: int, stops: Tensor, pad_id: int
) -> Int[Tensor, "batch new"]:
    """Greedy decoding with a KV cache; rows that have stopped are filled with ``pad_id``."""
    keep = {"logits_to_keep": 1} if _accepts_keep(model) else {}
    cache_name = _cache_argument(model)
    step_ids, mask, pos = batch.input_ids, batch.attention_mask, batch.position_ids
    done = torch.zeros(step_ids.shape[0], dtype=torch.bool, device=step_ids.device)
    past, out = None, []
    for _ in range(max_new_tokens):
        result = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **{cache_name: past},
            **keep,
        )
        past = result[cache_name] if cache_name in result else result.get("past_key_values")
        check_finite(result.logits[:, -1], "generation logits")
        nxt = result.logits[:, -1].argmax(-1).to(done.device)  # the head may be on another device
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out.append(nxt)
        done |= torch.isin(nxt, stops)
        if bool(done.all()):
            break
        step_ids, pos = nxt[:, None], pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(out, dim=1) if out else step_ids[:, :0]


def generate_from_ids(
    model: nn.Module,
    tokenizer: Any,
    sequences: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 48,
    batch_size: int | None = None,
    stop_ids: Sequence[int] | None = None,
    progress: bool = True,
) -> tuple[str, ...]:
    """Greedy completions of already-tokenized prompts (the engine under :func:`generate`).

    Returns:
        One decoded completion per sequence: new tokens only, cut before the first stop token
        (default :func:`stop_token_ids`), special tokens skipped.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    pad_id = _pad_id(tokenizer)
    stops = list(stop_ids) if stop_ids is not None else list(stop_token_ids(tokenizer, model))
    device = _device(model)
    stop_tensor = torch.tensor(stops, dtype=torch.long, device=device)
    lengths = [len(s) for s in sequences]
    size = generation_batch_size(model, max(lengths) + max_new_tokens, batch_size)
    results = [""] * len(sequences)
    bar = tqdm(total=len(sequences), desc="generate", unit="prompt", disable=not progress)
    for chunk in longest_first(lengths, size):
        batch = pad_sequences([sequences[i] for i in chunk], pad_id).to(device)
        new = _greedy(model, batch, max_new_tokens, stop_tensor, pad_id).cpu().tolist()
        for row, index in zip(new, chunk, strict=True):
            cut = next((k for k, t in enumerate(row) if t in stops), len(row))
            results[index] = tokenizer.decode(row[:cut], skip_special_tokens=True)
        bar.update(len(chunk))
    bar.close()
    return tuple(results)


def generate(
    lm: LoadedModel,
    prompts: Prompts | EncodedSet,
    *,
    max_new_tokens: int = 48,
    batch_size: int | None = None,
    system: str | None = None,
    intervention: Intervention = None,
    progress: bool = True,
) -> tuple[str, ...]:
    """Greedy completions of chat-formatted prompts, in input order.

    Returns:
        One string per prompt: the decoded new tokens (at most ``max_new_tokens``), without the
        prompt, the stop token or other special tokens.
    """
    encoded = encode_chat(lm, prompts, system)
    stops = stop_token_ids(lm.tokenizer, lm.base, lm.chat_template)
    with as_context(intervention, lm):
        return generate_from_ids(
            lm.model,
            lm.tokenizer,
            [e.input_ids for e in encoded],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            stop_ids=stops,
            progress=progress,
        )


def forward_batches(
    model: nn.Module,
    tokenizer: Any,
    seqs: Sequence[Sequence[int]],
    batch_size: int | None,
    progress: bool,
    desc: str,
    keep: Callable[[list[int]], int] = lambda chunk: 1,
    batch_context: Callable[[list[int]], AbstractContextManager[Any]] | None = None,
) -> Iterator[tuple[list[int], ChatBatch, Float[Tensor, "batch keep vocab"]]]:
    """Yield (indices, left-padded batch, logits at its last ``keep(indices)`` positions).

    ``batch_context(indices)`` (optional) returns a context manager entered around that batch's
    forward pass only, e.g. a row-wise intervention that gives each row its own direction.
    """
    lengths = [len(s) for s in seqs]
    size = generation_batch_size(model, max(lengths), batch_size)
    device, pad_id, supports = _device(model), _pad_id(tokenizer), _accepts_keep(model)
    bar = tqdm(total=len(seqs), desc=desc, unit="prompt", disable=not progress)
    for chunk in longest_first(lengths, size):
        batch, k = pad_sequences([seqs[i] for i in chunk], pad_id).to(device), keep(chunk)
        context = batch_context(chunk) if batch_context else contextlib.nullcontext()
        with torch.inference_mode(), context:
            logits = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
                **({"logits_to_keep": k} if supports else {}),
            ).logits[:, -k:]
        check_finite(logits, f"{desc} logits")
        yield chunk, batch, logits
        bar.update(len(chunk))
    bar.close()


@dataclass
class ForwardCounter:
    """Forward passes and prompt rows spent, for cost reporting (mutable, shared by callers)."""

    passes: int = 0
    """Batched forward passes run."""
    rows: int = 0
    """Prompt rows in those passes."""


def _token_sequences(
    lm: LoadedModel, prompts: Prompts | EncodedSet | Sequence[EncodedPrompt], system: str | None
) -> list[tuple[int, ...]]:
    if isinstance(prompts, EncodedSet):
        return [e.input_ids for e in prompts.encoded]
    if not isinstance(prompts, str) and len(prompts) and isinstance(prompts[0], EncodedPrompt):
        return [e.input_ids for e in prompts]  # type: ignore[union-attr]
    return [e.input_ids for e in encode_chat(lm, prompts, system)]  # type: ignore[arg-type]


def last_position_logprobs(
    lm: LoadedModel,
    prompts: Prompts | EncodedSet | Sequence[EncodedPrompt],
    *,
    batch_size: int | None = None,
    system: str | None = None,
    intervention: Intervention = None,
    batch_context: Callable[[list[int]], AbstractContextManager[Any]] | None = None,
    counter: ForwardCounter | None = None,
    progress: bool = True,
    desc: str = "logprobs",
) -> Float[Tensor, "n vocab"]:
    """Next-token log-probabilities at the first answer position (after the last prompt token).

    The one last-position log-prob function of the package: evaluation, the refusal score,
    candidate scoring and sweeps all use it. ``prompts`` may be already encoded (an
    :class:`~safegeom.models.chat.EncodedSet` or a list of ``EncodedPrompt``); ``intervention``
    acts on every batch, ``batch_context(rows)`` on the batch made of ``rows`` only (row-wise
    interventions); ``counter`` adds the passes and rows spent.

    Returns:
        float64 CPU tensor ``[n, vocab]`` of log-probabilities (nats), in input order.

    Raises:
        NonFiniteError: the logits hold NaN or inf.

    Example:
        >>> from safegeom.models import load_model
        >>> lm = load_model("tiny-chat")
        >>> lp = last_position_logprobs(lm, ["Write a poem."], progress=False)
        >>> lp.shape  # one row per prompt, one column per token of tiny-chat's vocabulary
        torch.Size([1, 3072])
    """
    seqs = _token_sequences(lm, prompts, system)
    out: Tensor | None = None
    with as_context(intervention, lm):
        for chunk, _, logits in forward_batches(
            lm.model, lm.tokenizer, seqs, batch_size, progress, desc, batch_context=batch_context
        ):
            lp = logits[:, -1].double().log_softmax(-1).cpu()
            out = lp.new_empty((len(seqs), lp.shape[-1])) if out is None else out
            out[chunk] = lp
            if counter is not None:
                counter.passes += 1
                counter.rows += len(chunk)
    assert out is not None
    return out
