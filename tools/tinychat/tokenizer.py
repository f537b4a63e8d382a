"""Byte-level BPE tokenizer and chat template for ``tiny-chat``.

The template renders a conversation as::

    <|bos|>[<|system|>\\n{system}<|end|>\\n]<|user|>\\n{content}<|end|>\\n<|assistant|>\\n

The user content is inserted verbatim (no trimming), so the instruction's character span can be found
in the rendered text. Four template tokens follow the instruction (``<|end|>``, ``\\n``,
``<|assistant|>``, ``\\n``): these are the post-instruction positions (t_post). The BOS token is part of
the template, and the tokenizer has no post-processor, so tokenizing the rendered text never adds a
second BOS; ``apply_chat_template(..., add_generation_prompt=True, tokenize=True)`` gives exactly the
prompt tokens the model was trained on. ``<|end|>`` is both the end-of-turn and the EOS token.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "ASSISTANT",
    "BOS",
    "CHAT_TEMPLATE",
    "END",
    "PAD",
    "SPECIAL_TOKENS",
    "SYSTEM",
    "USER",
    "train_tokenizer",
]

BOS = "<|bos|>"
"""Beginning-of-sequence token (rendered by the chat template)."""
END = "<|end|>"
"""End-of-turn token; also the EOS token generation stops at."""
PAD = "<|pad|>"
"""Padding token (never trained on)."""
USER = "<|user|>"
"""Header token of a user turn."""
ASSISTANT = "<|assistant|>"
"""Header token of an assistant turn."""
SYSTEM = "<|system|>"
"""Header token of the optional system message."""
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, END, USER, ASSISTANT, SYSTEM)
"""Special tokens, in id order (``<|pad|>`` is id 0)."""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if not loop.first %}{{ raise_exception('The system message must come first.') }}{% endif %}"
    "{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% else %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
"""Jinja chat template (user content verbatim; optional leading system message)."""


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 4096, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it with the chat template.

    Args:
        texts: Training texts (prompts and responses of the training corpus only).
        vocab_size: Total vocabulary size, special tokens and the 256 byte symbols included.
        min_frequency: Minimum pair count for a merge.

    Returns:
        A ``PreTrainedTokenizerFast`` with BOS/EOS/PAD set, left padding, and :data:`CHAT_TEMPLATE`.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        padding_side="left",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
