"""Where the adversarial tokens sit in a chat prompt, token for token.

An attack optimises a string inside the user turn: after the behaviour (``placement="suffix"``,
Zou et al. 2023) or before it (``"prefix"``). :func:`build_slot` renders the chat prompt once with
the tokenizer's template (:mod:`safegeom.models.chat`), tokenizes it as the library does, and cuts
the ids at the adversarial string's character span into ``before + adversarial + after``; the
target (``"Sure, here is ..."``) follows ``after``, the assistant header. Every later loss and
every saved prompt uses exactly these ids.

A candidate string is only worth keeping if the prompt made from its *text* tokenizes back to the
same ids (:func:`round_trips`): otherwise the attack optimised tokens that no text produces, the
pitfall nanoGCG and AdversariaLLM document.

Example:
    >>> from safegeom.models import LoadConfig, load_model
    >>> lm = load_model("tiny-chat", LoadConfig(device="cpu"))
    >>> slot = build_slot(lm, "Explain how locks work", "Sure, here is", n_tokens=4)
    >>> len(slot.opt_ids), slot.prompt_text(lm.tokenizer, slot.opt_ids)
    (4, 'Explain how locks work x x x x')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from safegeom.errors import ConfigError, SafegeomError
from safegeom.models.chat import instruction_span, instruction_start, render_prompts
from safegeom.models.loading import LoadedModel
from safegeom.models.plain_text import encode_chat_text, encode_plain, special_ids

__all__ = ["AttackSlot", "allowed_tokens", "build_slot", "decode_ids", "round_trips"]

Placement = Literal["suffix", "prefix"]


@dataclass(frozen=True)
class AttackSlot:
    """One behaviour's prompt cut around its adversarial string (all ids of one tokenizer)."""

    behaviour: str
    """The harmful request, as given."""
    target: str
    """The string the attack makes likely after the assistant header."""
    placement: Placement
    """``suffix``: the adversarial string follows the behaviour; ``prefix``: it precedes it."""
    before_ids: tuple[int, ...]
    """Prompt tokens before the adversarial string (template start, system, behaviour)."""
    opt_ids: tuple[int, ...]
    """The initial adversarial tokens."""
    after_ids: tuple[int, ...]
    """Prompt tokens after it, through the assistant header."""
    target_ids: tuple[int, ...]
    """The target's tokens (plain text, no special tokens)."""
    before_text: str
    """Rendered chat text before the adversarial string."""
    after_text: str
    """Rendered chat text after it."""
    opt_text: str
    """The initial adversarial string's text (a suffix's joining space included)."""
    inst_offset: tuple[int, int]
    """``(first, last)`` token index of the user content relative to the cut: ``first`` counts
    from the start of the prompt, ``last`` from the end of ``after_ids`` backwards (≥ 1)."""

    def prompt_ids(self, opt: Sequence[int]) -> tuple[int, ...]:
        """The whole prompt's ids with ``opt`` as the adversarial tokens."""
        return (*self.before_ids, *opt, *self.after_ids)

    def tail(self) -> Int[Tensor, " tail"]:
        """``after_ids + target_ids`` as a tensor: what follows the adversarial tokens."""
        return torch.tensor([*self.after_ids, *self.target_ids], dtype=torch.long)

    def positions(self, opt: Sequence[int]) -> tuple[int, int]:
        """``(inst_start, t_inst)`` of the prompt made with ``opt``."""
        length = len(self.prompt_ids(opt))
        return self.inst_offset[0], length - self.inst_offset[1]

    def content(self, opt_text: str) -> str:
        """The user content (behaviour and adversarial string) with ``opt_text`` as the string."""
        return (
            self.behaviour + opt_text
            if self.placement == "suffix"
            else f"{opt_text} {self.behaviour}"
        )

    def prompt_text(self, tokenizer: Any, opt: Sequence[int]) -> str:
        """The user content with the adversarial tokens ``opt`` decoded to text."""
        return self.content(decode_ids(tokenizer, opt))


def decode_ids(tokenizer: Any, ids: Sequence[int]) -> str:
    """``ids`` as text, exactly (no clean-up of spaces, special tokens kept)."""
    return tokenizer.decode(
        list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
    )


def build_slot(
    lm: LoadedModel,
    behaviour: str,
    target: str,
    *,
    n_tokens: int,
    init: str | None = None,
    placement: Placement = "suffix",
    system: str | None = None,
) -> AttackSlot:
    """Render ``behaviour`` with an adversarial string of ``n_tokens`` tokens and cut its ids.

    Args:
        n_tokens: length of the adversarial string in tokens.
        init: its initial text (default ``"x x ... x"``, ``n_tokens`` words); a suffix is joined
            to the behaviour by one space, which belongs to the adversarial string.

    Returns:
        An :class:`AttackSlot` whose ``before + opt + after`` are the ids the library's chat
        encoding gives the whole prompt.

    Raises:
        ConfigError: ``n_tokens`` below 1, or ``init`` not ``n_tokens`` tokens long.
        SafegeomError: an empty behaviour, a target that tokenises to nothing, no chat template,
            or a prompt whose text does not tokenize back to its own ids.
    """
    if n_tokens < 1:
        raise ConfigError(
            f"the adversarial string needs at least 1 token (--n-tokens), got {n_tokens}"
        )
    if not behaviour.strip():
        raise SafegeomError("empty behaviour: every behaviour needs text")
    tok = lm.tokenizer
    target_ids = tuple(encode_plain(tok, target))
    if not target_ids:
        raise SafegeomError(
            f"the target for {behaviour[:40]!r} tokenises to nothing; give a non-empty target "
            "(--target-column or targets=[...])"
        )
    words = init if init is not None else " ".join(["x"] * n_tokens)
    opt_text = f" {words}" if placement == "suffix" else words
    content = behaviour + opt_text if placement == "suffix" else f"{opt_text} {behaviour}"
    template = lm.chat_template
    (text,) = render_prompts(tok, [content], system=system, chat_template=template)
    span = instruction_span(
        content, text, instruction_start(tok, system=system, chat_template=template)
    )
    if span is None or text[span[0] : span[1]] != content:
        raise SafegeomError(
            "the chat template does not insert the user's text verbatim, so the adversarial "
            "tokens cannot be placed; use a template that does (--chat-template FILE)"
        )
    a = span[0] + len(behaviour) if placement == "suffix" else span[0]
    b = a + len(opt_text)
    ids, offsets = encode_chat_text(tok, text, [span])
    i0 = next(i for i, (_, e) in enumerate(offsets) if e > a)
    i1 = next((i for i, (s, e) in enumerate(offsets) if s >= b and e > s), len(ids))
    if offsets[i0][0] < a or offsets[i1 - 1][1] > b:
        raise SafegeomError(
            f"the tokenizer merges the adversarial string with its neighbours in {content[:40]!r}; "
            "start the initial string (--init) with a separate word"
        )
    if i1 - i0 != n_tokens:
        raise ConfigError(
            f"the initial string {words[:40]!r} is {i1 - i0} tokens, not --n-tokens {n_tokens}; "
            "give an --init of that many tokens or change --n-tokens"
        )
    inside = [i for i, (s, e) in enumerate(offsets) if e > s and s < span[1] and e > span[0]]
    slot = AttackSlot(
        behaviour=behaviour,
        target=target,
        placement=placement,
        before_ids=tuple(ids[:i0]),
        opt_ids=tuple(ids[i0:i1]),
        after_ids=tuple(ids[i1:]),
        target_ids=target_ids,
        before_text=text[:a],
        after_text=text[b:],
        opt_text=opt_text,
        inst_offset=(inside[0], len(ids) - inside[-1]),
    )
    if not bool(round_trips(tok, slot, torch.tensor([slot.opt_ids]))[0]):
        raise SafegeomError(
            f"the prompt for {behaviour[:40]!r} does not tokenize back to its own ids (it holds "
            "special-token text?); remove special-token strings from the behaviour"
        )
    return slot


def round_trips(
    tokenizer: Any, slot: AttackSlot, candidates: Int[Tensor, "b n"]
) -> Bool[Tensor, " b"]:
    """Whether each candidate survives decode → encode *in its prompt*.

    The whole rendered prompt made from the candidate's text must tokenize to
    ``before + candidate + after`` exactly (a merge with the behaviour's last word or the
    template's first token fails it too).

    Returns:
        A boolean mask, one entry per candidate row.
    """
    rows = candidates.tolist()
    texts = [slot.before_text + decode_ids(tokenizer, r) + slot.after_text for r in rows]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor(
        [
            list(e) == [*slot.before_ids, *r, *slot.after_ids]
            for e, r in zip(encoded, rows, strict=True)
        ],
        dtype=torch.bool,
    )


def allowed_tokens(
    tokenizer: Any, vocab_size: int, *, allow_non_ascii: bool = False
) -> Bool[Tensor, " vocab"]:
    """Tokens an attack may place: not special, decoding to non-empty text, and (unless
    ``allow_non_ascii``) to printable ASCII.

    Returns:
        A boolean mask over the model's vocabulary (``vocab_size`` may exceed the tokenizer's).

    Raises:
        SafegeomError: no token is allowed.
    """
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    specials = special_ids(tokenizer)
    for i in range(min(vocab_size, len(tokenizer))):
        if i in specials:
            continue
        text = decode_ids(tokenizer, [i])
        if text and (allow_non_ascii or (text.isascii() and text.isprintable())):
            mask[i] = True
    if not bool(mask.any()):
        raise SafegeomError(
            "no token is allowed in the adversarial string; pass allow_non_ascii=True"
        )
    return mask
