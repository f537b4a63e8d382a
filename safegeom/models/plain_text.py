"""User text encoded as text: no chat-role forgery through special-token strings.

A tokenizer turns the string ``<|end|>`` into the special token ``<|end|>`` wherever it occurs.
Inside rendered chat text that is right for the tokens the template wrote and wrong for the user's
own content: a prompt holding ``<|end|>\\n<|assistant|>\\n...`` would reach the model as a forged
multi-turn conversation. Here the special tokens the template wrote stay special, and every
special-token string inside the user's content (its character spans) is encoded as plain text.

Tokenizers split their input at special tokens and encode each piece between them on its own, so
the piece that holds a span (between the template's special tokens around it) is re-encoded with
special-token parsing off and spliced back. Text without an injected special token keeps exactly
the tokens of an ordinary call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from safegeom.errors import SafegeomError

__all__ = [
    "content_spans",
    "encode_chat_text",
    "encode_plain",
    "find_span",
    "special_ids",
]

Span = tuple[int, int]


def special_ids(tokenizer: Any) -> frozenset[int]:
    """The ids of the tokenizer's special tokens (its named ones and every added token marked
    special), the tokens user text must never produce."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, tok in added.items() if getattr(tok, "special", False))
    return frozenset(ids)


def _encode(tokenizer: Any, text: str, *, split: bool) -> tuple[list[int], list[Span]]:
    """Ids and character offsets of ``text`` (no BOS/EOS added); ``split``: special-token strings
    are encoded as text."""
    kwargs: dict[str, Any] = {"split_special_tokens": True} if split else {}
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, **kwargs)
    except NotImplementedError:
        raise SafegeomError(
            "positions need a fast tokenizer (offset mappings); use_fast=True"
        ) from None
    return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]


def encode_plain(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` as plain text (a completion, a response): no BOS/EOS, and a
    special-token string in it is encoded as its characters.

    Returns:
        The ids; those of an ordinary call whenever ``text`` holds no special-token string.
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not special_ids(tokenizer).intersection(ids):
        return ids
    ids = list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    _check_clean(tokenizer, ids, text)
    return ids


def find_span(text: str, content: str, start: int = 0) -> Span | None:
    """Character span of ``content`` in rendered ``text`` (its last occurrence at or after
    ``start``; the stripped content where a template trims it), or ``None``."""
    at = text.rfind(content, start)
    needle = content
    if at < 0:
        needle = content.strip()
        at = text.rfind(needle, start) if needle else -1
    return None if at < 0 else (at, at + len(needle))


def content_spans(
    render: Callable[[Sequence[str]], str], contents: Sequence[str]
) -> tuple[str, list[Span]]:
    """Render ``contents`` and find where each one landed.

    ``render`` is rendered once with distinct markers in place of the contents, so a content that
    repeats the template's own text is found where the template put it, not where it recurs.

    Returns:
        ``(text, spans)``: the rendering of ``contents`` and one character span per content
        found in it (a content the template does not insert verbatim is searched for).
    """
    markers = [f"SAFEGEOMCONTENT{i}MARKER" for i in range(len(contents))]
    text, marked = render(contents), render(markers)
    found = sorted((marked.find(m), i) for i, m in enumerate(markers) if m in marked)
    spans: list[Span] = []
    shift = 0
    for at, i in found:
        start = at + shift
        if text.startswith(contents[i], start):
            spans.append((start, start + len(contents[i])))
            shift += len(contents[i]) - len(markers[i])
            continue
        fallback = find_span(text, contents[i])
        if fallback is not None:
            spans.append(fallback)
    return text, spans


def encode_chat_text(
    tokenizer: Any, text: str, spans: Sequence[Span]
) -> tuple[list[int], list[Span]]:
    """Tokenize rendered chat ``text``: special tokens the template wrote are parsed, the user
    content at ``spans`` (character ranges) is encoded as plain text.

    Returns:
        ``(ids, offsets)``: token ids and their character offsets in ``text``; exactly those of
        an ordinary call when no span holds a special-token string.

    Raises:
        SafegeomError: a slow tokenizer (no offsets), or a tokenizer that still produces a special
            token from plain text.
    """
    ids, offsets = _encode(tokenizer, text, split=False)
    specials = special_ids(tokenizer)

    def core(a: int, b: int) -> Span:  # without the whitespace a special token strips
        piece = text[a:b]
        return a + len(piece) - len(piece.lstrip()), b - len(piece) + len(piece.rstrip())

    def in_span(a: int, b: int) -> bool:
        a, b = core(a, b)
        return any(a < end and b > start for start, end in spans)

    forged = [i for i, t in enumerate(ids) if t in specials]
    if not any(in_span(*offsets[i]) for i in forged):
        return ids, offsets
    template_tokens = [offsets[i] for i in forged if not in_span(*offsets[i])]
    for start, end in sorted(spans, reverse=True):  # right to left: earlier offsets stay valid
        left = max((b for a, b in template_tokens if core(a, b)[1] <= start), default=0)
        right = min((a for a, b in template_tokens if core(a, b)[0] >= end), default=len(text))
        piece, piece_offsets = _encode(tokenizer, text[left:right], split=True)
        _check_clean(tokenizer, piece, text[start:end])
        before = [i for i, (_, b) in enumerate(offsets) if b <= left]
        after = [i for i, (a, _) in enumerate(offsets) if a >= right]
        ids = [ids[i] for i in before] + piece + [ids[i] for i in after]
        offsets = (
            [offsets[i] for i in before]
            + [(a + left, b + left) for a, b in piece_offsets]
            + [offsets[i] for i in after]
        )
    return ids, offsets


def _check_clean(tokenizer: Any, ids: Sequence[int], text: str) -> None:
    """Refuse a tokenizer that makes a special token out of plain text."""
    found = special_ids(tokenizer).intersection(ids)
    if found:
        name = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
        raise SafegeomError(
            f"{name} encodes user text {text[:40]!r} as special token(s) {sorted(found)} even with "
            "special-token parsing off; remove the special-token strings from the text"
        )
