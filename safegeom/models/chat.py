"""Chat formatting and exact token positions.

Prompts are rendered with the tokenizer's own chat template (optional system prompt, generation
prompt on) and tokenized as transformers' ``apply_chat_template(tokenize=True)`` does: without
adding special tokens, since the template writes them. For every prompt we then know:

- ``t_inst``: the last token of the user's instruction, found from the instruction's character
  span in the rendered text and the tokenizer's offset mapping (a token that straddles the end of
  the instruction counts as instruction);
- ``t_post``: the template tokens after the instruction, through the last prompt token;
- ``last``: the last prompt token.

Batches are left-padded; position ids are recomputed from the attention mask, so a prompt gives
the same activations alone and inside a padded batch (also for absolute position embeddings).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from torch import Tensor

from safegeom.artifacts import sha256_text
from safegeom.errors import SafegeomError
from safegeom.models.plain_text import encode_chat_text, find_span

__all__ = [
    "ChatBatch",
    "EncodedPrompt",
    "EncodedSet",
    "Encoder",
    "collate_left",
    "encode_prompts",
    "encode_set",
    "is_pre_encoded",
    "render_prompts",
    "template_hash",
]

Encoder = Callable[..., list["EncodedPrompt"]]
"""``encode(tokenizer, texts, *, system, chat_template) -> [EncodedPrompt]``, as
:func:`encode_prompts` (which :func:`encode_set` uses unless told otherwise)."""


@dataclass(frozen=True)
class EncodedPrompt:
    """One tokenized chat prompt, unpadded."""

    input_ids: tuple[int, ...]
    t_inst: int
    """Index of the last instruction token."""
    inst_start: int
    """Index of the first instruction token."""

    @property
    def n_post(self) -> int:
        """Number of template tokens after the instruction (the ``t_post`` tokens)."""
        return len(self.input_ids) - 1 - self.t_inst

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class ChatBatch:
    """A left-padded batch of encoded prompts, with positions in padded coordinates."""

    input_ids: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    position_ids: Int[Tensor, "batch seq"]
    t_inst: Int[Tensor, " batch"]
    """Padded index of each prompt's last instruction token."""
    lengths: Int[Tensor, " batch"]
    """Unpadded length of each prompt."""

    @property
    def seq_len(self) -> int:
        """Padded sequence length."""
        return int(self.input_ids.shape[1])

    def to(self, device: torch.device | str) -> ChatBatch:
        """Return the batch on ``device``."""
        return ChatBatch(*(t.to(device) for t in self.as_tuple()))

    def as_tuple(self) -> tuple[Tensor, ...]:
        """The tensors, in field order."""
        return (self.input_ids, self.attention_mask, self.position_ids, self.t_inst, self.lengths)


def _template(tokenizer, chat_template: str | None) -> str:
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        name = getattr(tokenizer, "name_or_path", "this tokenizer")
        raise SafegeomError(
            f"{name} has no chat template; pass chat_template=... (--chat-template FILE on the "
            "command line)"
        )
    return template


def _messages(instruction: str, system: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": instruction}]


def render_prompts(
    tokenizer,
    prompts: Sequence[str],
    *,
    system: str | None = None,
    chat_template: str | None = None,
) -> list[str]:
    """Render each instruction with the chat template, ending with the generation prompt.

    Returns:
        One rendered string per prompt.
    """
    template = _template(tokenizer, chat_template)
    return [
        tokenizer.apply_chat_template(
            _messages(p, system),
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )
        for p in prompts
    ]


def encode_prompts(
    tokenizer,
    prompts: Sequence[str],
    *,
    system: str | None = None,
    chat_template: str | None = None,
) -> list[EncodedPrompt]:
    """Tokenize chat prompts and locate the instruction in each.

    Returns:
        One :class:`EncodedPrompt` per prompt, in input order.

    Raises:
        ValueError: an empty prompt set or prompt, a tokenizer without a chat template (and no
            ``chat_template``), a template that does not insert the instruction verbatim, or a
            tokenizer without offset mappings (a slow tokenizer).
    """
    if len(prompts) == 0:
        raise SafegeomError("empty prompt set: pass at least one prompt")
    rendered = render_prompts(tokenizer, prompts, system=system, chat_template=chat_template)
    at = instruction_start(tokenizer, system=system, chat_template=chat_template)
    return [_locate(tokenizer, p, text, at) for p, text in zip(prompts, rendered, strict=True)]


_MARKER = "SAFEGEOMINSTRUCTIONMARKER"


def instruction_start(
    tokenizer, *, system: str | None = None, chat_template: str | None = None
) -> int | None:
    """Where the chat template puts the user's instruction: the character index of a marker
    instruction in its rendering, or ``None`` if the template does not insert it verbatim."""
    (text,) = render_prompts(tokenizer, [_MARKER], system=system, chat_template=chat_template)
    at = text.find(_MARKER)
    return at if at >= 0 else None


def instruction_span(prompt: str, text: str, start: int | None) -> tuple[int, int] | None:
    """Character span of ``prompt`` in its rendering ``text``: at ``start`` (from
    :func:`instruction_start`; stripped where the template trims), else its last occurrence.
    A prompt that repeats the template's own text is thus found where the user put it."""
    if start is not None:
        for needle in (prompt, prompt.strip()):
            if needle and text.startswith(needle, start):
                return start, start + len(needle)
    return find_span(text, prompt)


@dataclass(frozen=True)
class EncodedSet:
    """A prompt set tokenized once for one tokenizer, template and system prompt.

    Every stage that needs token positions (capture, the refusal-score filter, candidate scoring,
    evaluation) takes this value instead of re-encoding the texts; :func:`encode_set` builds it.
    ``name`` and ``content_hash`` come from the prompt set (a
    :class:`~safegeom.prompts.PromptSet`) when it has them.
    """

    prompts: tuple[str, ...]
    """The instruction texts, in order."""
    encoded: tuple[EncodedPrompt, ...] = field(repr=False)
    """One encoding per prompt, in the same order."""
    system: str | None
    """The system prompt used, if any."""
    template_hash: str
    """sha256 of the chat template used to render the prompts."""
    name: str = "inline"
    """The prompt set's name (bundled spec or file path)."""
    content_hash: str = ""
    """The prompt set's content hash."""

    def __len__(self) -> int:
        return len(self.encoded)

    def select(self, indices: Sequence[int]) -> EncodedSet:
        """The subset at ``indices`` (in that order), sharing the encodings."""
        return EncodedSet(
            prompts=tuple(self.prompts[i] for i in indices),
            encoded=tuple(self.encoded[i] for i in indices),
            system=self.system,
            template_hash=self.template_hash,
            name=f"{self.name}[subset]",
            content_hash="",
        )

    def matches(self, system: str | None, template_hash: str) -> bool:
        """Whether this set was encoded with ``system`` and the template of ``template_hash``."""
        return self.system == system and self.template_hash == template_hash


def is_pre_encoded(prompts: object) -> bool:
    """Whether ``prompts`` encodes itself: an object with ``encoded_for(tokenizer, *, system,
    chat_template) -> EncodedSet`` (a :class:`~safegeom.attacks.AttackSet`), whose own token ids
    :func:`encode_set` then takes where they fit the tokenizer.

    Example:
        >>> is_pre_encoded(["Explain how locks work"])
        False
    """
    return callable(getattr(prompts, "encoded_for", None))


def template_hash(tokenizer, chat_template: str | None = None) -> str:
    """sha256 of the chat template that :func:`render_prompts` would use."""
    return sha256_text(_template(tokenizer, chat_template))


def encode_set(
    tokenizer,
    prompts: Sequence[str] | EncodedSet,
    *,
    system: str | None = None,
    chat_template: str | None = None,
    max_positions: int | None = None,
    encode: Encoder | None = None,
) -> EncodedSet:
    """Tokenize a prompt set once and locate every instruction (see :func:`encode_prompts`).

    An :class:`EncodedSet` built with the same system prompt and template is returned as it is.
    A pre-encoded prompt source (an object with ``encoded_for(tokenizer, *, system,
    chat_template) -> EncodedSet``, such as a :class:`~safegeom.attacks.AttackSet`) encodes
    itself: its own token ids where they fit this tokenizer.

    Args:
        max_positions: the model's context length (``max_position_embeddings``); a longer prompt
            is refused.
        encode: what tokenizes the texts (default :func:`encode_prompts`): the sharded twins of
            :mod:`safegeom.parallel` pass one that shares the tokenizing over the ranks
            (:func:`safegeom.parallel.encoding.encode_dealt`); it must return the same encodings.

    Raises:
        SafegeomError: as :func:`encode_prompts`, and a prompt longer than ``max_positions``.
    """
    t_hash = template_hash(tokenizer, chat_template)
    if is_pre_encoded(prompts):
        prompts = prompts.encoded_for(tokenizer, system=system, chat_template=chat_template)  # type: ignore[union-attr]
    if isinstance(prompts, EncodedSet):
        if prompts.matches(system, t_hash):
            return prompts
        prompts = prompts.prompts
    texts = tuple(prompts)
    run = encode_prompts if encode is None else encode
    encoded = tuple(run(tokenizer, texts, system=system, chat_template=chat_template))
    if max_positions is not None:
        longest = max(range(len(encoded)), key=lambda i: len(encoded[i]))
        if len(encoded[longest]) > max_positions:
            raise SafegeomError(
                f"prompt {longest} is {len(encoded[longest])} tokens long but the model takes at "
                f"most {max_positions} positions; shorten or drop it"
            )
    return EncodedSet(
        prompts=texts,
        encoded=encoded,
        system=system,
        template_hash=t_hash,
        name=str(getattr(prompts, "name", "inline")),
        content_hash=_content_hash(prompts),
    )


def _content_hash(prompts: Sequence[str]) -> str:
    value = getattr(prompts, "content_hash", "")
    return str(value() if callable(value) else value)


def _locate(tokenizer, prompt: str, text: str, at: int | None) -> EncodedPrompt:
    if not prompt.strip():
        raise SafegeomError("empty prompt: every instruction needs text")
    span = instruction_span(prompt, text, at)
    if span is None:
        raise SafegeomError(
            "the chat template does not insert the instruction verbatim, so t_inst cannot be "
            f"located; instruction starts {prompt[:40]!r}"
        )
    start, end = span
    ids, offsets = encode_chat_text(tokenizer, text, [span])
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not inside:
        raise SafegeomError(f"no token covers the instruction {prompt[:40]!r}")
    return EncodedPrompt(input_ids=tuple(ids), t_inst=inside[-1], inst_start=inside[0])


def collate_left(encoded: Sequence[EncodedPrompt], pad_token_id: int) -> ChatBatch:
    """Left-pad a list of encoded prompts into a :class:`ChatBatch` (on CPU).

    Position ids count real tokens only (``cumsum(mask) - 1``, padding at 0), matching how the
    model sees each prompt alone.
    """
    if not encoded:
        raise SafegeomError("empty prompt set: pass at least one prompt")
    lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long)
    seq = int(lengths.max())
    ids = torch.full((len(encoded), seq), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), seq), dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, seq - len(e) :] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[row, seq - len(e) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    t_inst = torch.tensor([e.t_inst for e in encoded], dtype=torch.long) + (seq - lengths)
    return ChatBatch(ids, mask, position_ids, t_inst, lengths)
