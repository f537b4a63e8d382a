"""Tokenising (prompt, response) pairs for fine-tuning, with loss on the response only.

The assistant turn is derived from the chat template itself. For each pair we render
``[user, assistant]`` (no generation prompt) and ``[user]`` with the generation prompt, and check
that the first rendering starts with the second; a template that renders the assistant turn
differently from the generation prompt raises. The completion is the rest of the full rendering:
the response and the template text around it, cut right after the first special token that follows
the response (the end-of-turn token, ``<|end|>``/``<|eot_id|>``/``<end_of_turn>``...). Template text
after that token (a newline, say) is dropped: generation stops at the end-of-turn token. Where the
template writes no special token after the response, the EOS token is appended.

Prompt tokens are exactly those of :func:`safegeom.models.render_prompts` tokenized without added
special tokens (what the model sees at inference), and get label ``-100``; completion tokens are
their own labels. Special-token strings inside a prompt or a response are encoded as text
(:mod:`safegeom.models.plain_text`), so a training pair cannot forge a chat turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from safegeom.errors import SafegeomError
from safegeom.models import render_prompts
from safegeom.models.chat import instruction_span, instruction_start
from safegeom.models.plain_text import encode_chat_text

__all__ = [
    "IGNORE_INDEX",
    "Example",
    "ExampleOrder",
    "TrainBatch",
    "collate_right",
    "encode_examples",
]

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (prompt and padding)."""


@dataclass(frozen=True)
class Example:
    """One tokenized training conversation."""

    input_ids: tuple[int, ...]
    n_prompt: int
    """Number of leading prompt tokens (label ``-100``); the rest are response tokens."""

    @property
    def labels(self) -> tuple[int, ...]:
        """Per-token labels: ``-100`` on the prompt, the token itself on the response."""
        return (IGNORE_INDEX,) * self.n_prompt + self.input_ids[self.n_prompt :]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class TrainBatch:
    """A right-padded batch: padding has attention 0 and label ``-100``."""

    input_ids: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    labels: Int[Tensor, "batch seq"]

    def to(self, device: torch.device | str) -> TrainBatch:
        """Return the batch on ``device``."""
        return TrainBatch(
            *(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels))
        )

    @property
    def n_target_tokens(self) -> int:
        """Number of tokens that carry loss (before the causal shift)."""
        return int((self.labels != IGNORE_INDEX).sum())


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(i for i, tok in added.items() if getattr(tok, "special", False))
    return ids


def _completion_ids(tokenizer, completion: str, response: str, specials: set[int]) -> list[int]:
    """Tokens of the assistant turn: through the first special token after the response."""
    needle = response
    start = completion.find(needle)
    if start < 0:  # templates that trim the content
        needle = response.strip()
        start = completion.find(needle)
    if start < 0:
        raise SafegeomError(
            "the chat template does not insert the response verbatim; response starts "
            f"{response[:40]!r}"
        )
    end = start + len(needle)
    ids, offsets = encode_chat_text(tokenizer, completion, [(start, end)])
    for i, (tok, (a, _)) in enumerate(zip(ids, offsets, strict=True)):
        if tok in specials and a >= end:
            return ids[: i + 1]
    kept = [tok for tok, (a, _) in zip(ids, offsets, strict=True) if a < end]
    if tokenizer.eos_token_id is None:
        raise SafegeomError(
            "the chat template ends no turn with a special token and there is no EOS"
        )
    return [*kept, int(tokenizer.eos_token_id)]


def encode_examples(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    system: str | None = None,
    chat_template: str | None = None,
    max_length: int | None = None,
) -> list[Example]:
    """Tokenize prompt/response pairs as chat conversations with response-only labels.

    Args:
        tokenizer: A fast tokenizer with a chat template (or pass ``chat_template``).
        prompts: User instructions.
        responses: Assistant responses, aligned with ``prompts``.
        system: Optional system prompt.
        chat_template: A Jinja template to use instead of the tokenizer's own.
        max_length: Truncate each conversation to this many tokens (response tokens are cut).

    Returns:
        One :class:`Example` per pair, in input order.

    Raises:
        ValueError: misaligned or empty input, no chat template, a template whose assistant turn
            does not start with its generation prompt, or a prompt that leaves no room for the
            response within ``max_length``.
    """
    if len(prompts) != len(responses):
        raise SafegeomError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise SafegeomError("empty task: pass at least one prompt/response pair")
    rendered = render_prompts(tokenizer, prompts, system=system, chat_template=chat_template)
    template = chat_template or tokenizer.chat_template
    specials = _special_ids(tokenizer)
    at = instruction_start(tokenizer, system=system, chat_template=chat_template)
    examples = []
    for prompt, response, prompt_text in zip(prompts, responses, rendered, strict=True):
        messages = [{"role": "system", "content": system}] if system else []
        messages += [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": response},
        ]
        full = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
        if not full.startswith(prompt_text):
            raise SafegeomError(
                "the chat template renders [user, assistant] with a different prefix than the "
                "generation prompt, so response-only labels cannot be derived; pass a template "
                "(chat_template=...) whose assistant turn starts with its generation prompt"
            )
        span = instruction_span(prompt, prompt_text, at)
        prompt_ids = encode_chat_text(tokenizer, prompt_text, [span] if span else [])[0]
        ids = prompt_ids + _completion_ids(tokenizer, full[len(prompt_text) :], response, specials)
        if max_length is not None:
            if len(prompt_ids) >= max_length:
                raise SafegeomError(
                    f"prompt of {len(prompt_ids)} tokens leaves no room for a response within "
                    f"max_length={max_length}; prompt starts {prompt[:40]!r}"
                )
            ids = ids[:max_length]
        examples.append(Example(input_ids=tuple(ids), n_prompt=len(prompt_ids)))
    return examples


def collate_right(examples: Sequence[Example], pad_token_id: int) -> TrainBatch:
    """Right-pad examples into a :class:`TrainBatch` (on CPU).

    Right padding keeps position ids 0, 1, ... for real tokens without passing them explicitly.

    Returns:
        The batch, with ``-100`` labels on prompt and padding tokens.
    """
    if not examples:
        raise SafegeomError("empty batch: pass at least one example")
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e)] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[row, : len(e)] = 1
        labels[row, : len(e)] = torch.tensor(e.labels, dtype=torch.long)
    return TrainBatch(ids, mask, labels)


class ExampleOrder:
    """The deterministic example order of a run: data position k → example index.

    The example at position k is ``perm_e[k mod n]``, where ``perm_e`` is a permutation of the
    ``n`` examples seeded by (seed, epoch ``e = k div n``). The order depends only on the seed and
    the position, so a resumed run needs nothing but its step count to continue the data stream.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self._perms = n, seed, {}

    def index(self, position: int) -> int:
        """Return the example index at data position ``position``."""
        epoch, offset = divmod(position, self.n)
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=gen).tolist()}
        return self._perms[epoch][offset]
