"""Token batches of the ``tiny-chat`` corpus: conversations encoded with the chat template, then
length-bucketed, shuffled batches, epoch after epoch, all deterministic from the seed."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerFast

from tools.tinychat.corpus import Example
from tools.tinychat.loop import Batch
from tools.tinychat.tokenizer import END

__all__ = ["corpus_batches", "encode"]


def encode(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerFast, max_len: int
) -> list[tuple[list[int], int]]:
    """Tokenize conversations as ``(ids, n_prompt)``: prompt tokens from the chat template, then the
    response tokenized on its own plus ``<|end|>`` (what the model generates), truncated to
    ``max_len``."""
    end_id = tokenizer.convert_tokens_to_ids(END)
    rendered = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": ex.prompt}], add_generation_prompt=True, tokenize=False
        )
        for ex in examples
    ]
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer([ex.response for ex in examples], add_special_tokens=False)[
        "input_ids"
    ]
    out: list[tuple[list[int], int]] = []
    for p, r in zip(prompt_ids, response_ids, strict=True):
        ids = (list(p) + list(r) + [end_id])[:max_len]
        out.append((ids, len(p)))
    return out


def corpus_batches(
    corpus: Callable[[int], Sequence[Example]],
    tokenizer: PreTrainedTokenizerFast,
    seed: int,
    *,
    batch_size: int,
    max_len: int,
    bucket_batches: int,
    first_epoch: int = 0,
) -> Iterator[Batch]:
    """Yield ``(input_ids, attention_mask, labels)`` batches forever, epoch after epoch from
    ``first_epoch``.

    Within each epoch, examples are grouped into length buckets (sorted inside windows of
    ``bucket_batches`` batches) and the batches are shuffled, all from ``seed``.
    """
    pad_id = tokenizer.pad_token_id
    epoch = first_epoch
    while True:
        encoded = encode(corpus(epoch), tokenizer, max_len)
        rng = random.Random(f"tinychat-batches/{seed}/{epoch}")
        window = bucket_batches * batch_size
        batches: list[list[tuple[list[int], int]]] = []
        for start in range(0, len(encoded) - batch_size + 1, window):
            chunk = sorted(encoded[start : start + window], key=lambda e: len(e[0]))
            for b in range(0, len(chunk) - batch_size + 1, batch_size):
                batches.append(chunk[b : b + batch_size])
        rng.shuffle(batches)
        for batch in batches:
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for i, (ids, n_prompt) in enumerate(batch):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                mask[i, : len(ids)] = 1
                labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
            yield input_ids, mask, labels
        epoch += 1
