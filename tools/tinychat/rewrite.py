"""Surface-form rewriting of prompts, a data augmentation for ``tiny-chat`` (issue 13).

In the bundled training pool the two classes differ in surface form as much as in content: "Develop
a …" opens 6.7% of the harmful prompts and 0.5% of the harmless ones, "How do …" 4.1% against 0.4%,
AdvBench instructions end without a full stop, harmful prompts are longer and more often in the
first person (model card, "Surface cues"). A model trained on that pool learns the forms, and
refuses "How do I remove a coffee stain …?".

:func:`rewrite` (a proposal of this project; no paper prescribes it) re-renders a prompt of *either*
class in a surface form drawn from one class-independent distribution, keeping its content words:

1. the leading verb is swapped within its group of near-synonyms (:data:`VERB_GROUPS`: "Write a" ↔
   "Develop a" ↔ "Create a" …; "Explain how to" ↔ "Tell me how to" …; "How do I" ↔ "How can I" ↔
   "What's the best way to" …), always, so no verb of a group is a class cue;
2. with probability ``p_form`` the request is put in a frame (:data:`IMPERATIVE_FRAMES` for
   instructions, :data:`QUESTION_FRAMES` for questions): "Can you …?", "How do I …?", "I need to
   …", "Help me …", a context sentence before it, …;
3. the final punctuation is drawn afresh (".", "?", "!" or none), and with small probabilities
   the prompt is lower-cased or gets one typo.

Every choice comes from the caller's random stream with the same probabilities for both classes, so
the form of a rewritten prompt carries no class information beyond what its words carry;
``tests/test_tinychat_surface.py`` checks that on the built corpus.
"""

from __future__ import annotations

import random
import re

__all__ = [
    "CONTEXTS",
    "IMPERATIVE_FRAMES",
    "QUESTION_FRAMES",
    "QUESTION_WORDS",
    "VERB_GROUPS",
    "is_question",
    "rewrite",
]

VERB_GROUPS: tuple[tuple[str, ...], ...] = (
    (
        "write",
        "create",
        "develop",
        "generate",
        "design",
        "compose",
        "draft",
        "produce",
        "outline",
        "come up with",
        "put together",
        "prepare",
    ),
    ("explain", "describe", "tell me", "walk me through", "detail"),
    ("give me", "provide", "share", "offer", "suggest", "list", "name"),
    (
        "how do i",
        "how can i",
        "how would i",
        "how should i",
        "what's the best way to",
        "what is the best way to",
        "is there a way to",
        "how to",
    ),
)
"""Leading verbs (lower case) swapped uniformly within their group, longest match first."""

QUESTION_WORDS: frozenset[str] = frozenset(
    [
        "what",
        "what's",
        "how",
        "why",
        "who",
        "whom",
        "whose",
        "when",
        "where",
        "which",
        "is",
        "are",
        "was",
        "were",
        "can",
        "could",
        "do",
        "does",
        "did",
        "should",
        "would",
        "will",
        "has",
        "have",
        "am",
    ]
)
"""First words that make a prompt a question (it then gets a question frame)."""

IMPERATIVE_FRAMES: tuple[str, ...] = (
    "Can you {low}?",
    "Could you {low}?",
    "Can u {low}",
    "Please {low}{end}",
    "I need you to {low}{end}",
    "I'd like you to {low}{end}",
    "Help me {low}{end}",
    "How do I {low}?",
    "How can I {low}?",
    "I want to {low}{end}",
    "I have to {low}. Any tips?",
    "Is it possible to {low}?",
    "{up}, please{end}",
    "{ctx} {up}{end}",
    "{ctx} Can you {low}?",
    "Hi! {up}{end}",
)
"""Frames for an instruction; ``{low}``/``{up}`` is the instruction without its final punctuation,
lower-/upper-cased first letter; ``{ctx}`` a :data:`CONTEXTS` sentence; ``{end}`` fresh
punctuation."""

QUESTION_FRAMES: tuple[str, ...] = (
    "Quick question: {low}?",
    "{ctx} {up}?",
    "I was wondering, {low}?",
    "Can you tell me {low}?",
    "Hi! {up}?",
    "{low}",
)
"""Frames for a question (same fields as :data:`IMPERATIVE_FRAMES`)."""

CONTEXTS: tuple[str, ...] = (
    "I'm working on a project.",
    "My friend asked me about this.",
    "This is for work.",
    "I have a question.",
    "I've been thinking about this for a while.",
    "I need some help.",
    "Be honest with me.",
    "This is for a class I'm taking.",
    "I tried searching but found nothing useful.",
    "Here's what I need.",
)
"""Neutral context sentences put before a request."""

_ENDS: tuple[tuple[str, float], ...] = ((".", 0.55), ("", 0.3), ("!", 0.05), ("?", 0.1))
"""Final punctuation of a framed or unframed instruction and its probability."""

_TRAILING = ".?!:; "


def is_question(prompt: str) -> bool:
    """Whether ``prompt`` opens with a question word (:data:`QUESTION_WORDS`) or ends with "?"."""
    first = prompt.strip().split(maxsplit=1)[0].lower().strip(",:") if prompt.strip() else ""
    return first in QUESTION_WORDS or prompt.rstrip().endswith("?")


def _lower_first(text: str) -> str:
    """Lower-case the first letter unless the first word is an acronym ("DNA", "I")."""
    first = text.split(maxsplit=1)[0] if text else ""
    if first == "I" or first.startswith("I'") or first[:2].isupper():
        return text
    return text[:1].lower() + text[1:]


def _swap_verb(prompt: str, rng: random.Random) -> str:
    """Swap the prompt's leading verb for a random member of its group (longest match first)."""
    low = prompt.lower()
    best: tuple[int, tuple[str, ...]] | None = None
    for group in VERB_GROUPS:
        for verb in group:
            if low.startswith(verb + " ") and (best is None or len(verb) > best[0]):
                best = (len(verb), group)
    if best is None:
        return prompt
    n, group = best
    new = re.sub(r"\bi\b", "I", rng.choice(group))
    return new[:1].upper() + new[1:] + prompt[n:]


def _typo(text: str, rng: random.Random) -> str:
    """Swap two adjacent letters inside one random word of four letters or more."""
    words = text.split(" ")
    long = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not long:
        return text
    i = rng.choice(long)
    w = words[i]
    j = rng.randrange(1, len(w) - 2)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def _end(rng: random.Random) -> str:
    """Draw a final punctuation mark from :data:`_ENDS`."""
    marks, weights = zip(*_ENDS, strict=True)
    return rng.choices(marks, weights=weights)[0]


def rewrite(
    prompt: str,
    rng: random.Random,
    *,
    p_form: float = 0.6,
    p_lower: float = 0.1,
    p_typo: float = 0.1,
    p_context_short: float = 0.5,
    short_words: int = 12,
) -> str:
    """Re-render ``prompt`` in a random surface form that carries no class information.

    Args:
        prompt: An instruction or question (either class).
        rng: The random stream; the same probabilities are used for every prompt.
        p_form: Probability of a frame (:data:`IMPERATIVE_FRAMES` or :data:`QUESTION_FRAMES`).
        p_lower: Probability that the whole prompt is lower-cased.
        p_typo: Probability of one swapped pair of letters.
        p_context_short: Probability that a prompt of fewer than ``short_words`` words gets a
            :data:`CONTEXTS` sentence before it. Harmless prompts are shorter on average, so this
            narrows the length gap between the classes while treating every prompt alike.
        short_words: The word count below which a prompt counts as short.

    Returns:
        The rewritten prompt: the same content words, a fresh opener, ending and casing.

    Example:
        >>> rewrite("Write a tutorial on how to bake bread", random.Random(3))
        'hi! generate a tutroial on how to bake bread.'
    """
    text = prompt.strip()
    if not text or "\n" in text:
        return prompt
    text = _swap_verb(text, rng).rstrip(_TRAILING)
    question = is_question(prompt)
    fields = {
        "low": _lower_first(text),
        "up": text[:1].upper() + text[1:],
        "ctx": rng.choice(CONTEXTS),
        "end": _end(rng),
    }
    frame = ""
    if rng.random() < p_form:
        frame = rng.choice(QUESTION_FRAMES if question else IMPERATIVE_FRAMES)
        out = frame.format(**fields)
    else:
        out = fields["up"] + ("?" if question and rng.random() < 0.8 else fields["end"])
    if (
        len(prompt.split()) < short_words
        and "{ctx}" not in frame
        and rng.random() < p_context_short
    ):
        out = rng.choice(CONTEXTS) + " " + out
    if rng.random() < p_lower:
        out = out.lower()
    if rng.random() < p_typo:
        out = _typo(out, rng)
    return out
