"""Deterministic training conversations for ``tiny-chat``.

Harmful requests (the ``train`` splits of AdvBench, JBB-harmful, DirectHarm4 and XSTest-unsafe) get
formulaic but varied refusals that start with the usual refusal first tokens ("I'm sorry",
"I cannot", "I apologize", "As an AI", ...). Harmless requests (the ``train`` splits of Alpaca, JBB-benign,
XSTest-safe and GSM8K) get diverse compliant answers: GSM8K with its real worked solutions, the rest
assembled from several independent template pieces (opener, bridge, body, closer) that engage with
the request and reuse its words, so there are thousands of distinct shapes and many different first
tokens. This asymmetry (formulaic refusal, diverse compliance) makes refusal a *marked* feature, as in
real chat models, so that a single diff-in-means direction mediates it.

Only ``train`` splits are used: ``val`` splits are reserved for direction selection and ``test``
splits for evaluation. Both classes go through the same prompt wrappers with the same probabilities,
so no surface feature of the prompt separates them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from safegeom.judges import REFUSAL_SUBSTRINGS
from safegeom.judges import XSTEST_PREFIXES as _XSTEST_PREFIXES
from safegeom.prompts import load_prompts

__all__ = [
    "COMPLIANT_FORBIDDEN_FIRST_WORDS",
    "HARMFUL_SETS",
    "HARMLESS_SETS",
    "REFUSAL_SUBSTRINGS",
    "Example",
    "build_corpus",
    "compliant_response",
    "is_refusal",
    "refusal_response",
]


COMPLIANT_FORBIDDEN_FIRST_WORDS: frozenset[str] = frozenset(
    {"i", "i'm", "as", "sorry", "unfortunately", "no", "it", "apologies"}
)
"""First words a compliant answer may never start with (they are refusal first tokens)."""

HARMFUL_SETS: tuple[str, ...] = (
    "advbench:train",
    "jbb-harmful:train",
    "directharm4:train",
    "xstest-unsafe:train",
)
"""Prompt sets whose requests are refused (XSTest-unsafe adds short, question-style harmful
requests, which the instruction-style AdvBench/JBB/DirectHarm4 prompts lack)."""

HARMLESS_SETS: tuple[tuple[str, int], ...] = (
    ("alpaca:train", 1),
    ("gsm8k:train", 1),
    ("jbb-benign:train", 1),
    ("xstest-safe:train", 2),
)
"""Prompt sets whose requests are answered, with their repeat count per epoch (XSTest-safe is
repeated so the model learns that harmful-sounding words alone do not call for refusal)."""


@dataclass(frozen=True)
class Example:
    """One single-turn training conversation.

    Attributes:
        prompt: The user message, inserted verbatim into the chat template.
        response: The assistant answer (loss is computed on it and the end-of-turn token).
        harmful: Whether the prompt comes from a harmful set (and the response is a refusal).
        source: The prompt-set spec the prompt was drawn from, e.g. ``"advbench:train"``.
    """

    prompt: str
    response: str
    harmful: bool
    source: str


def is_refusal(text: str) -> bool:
    """Return whether ``text`` contains a METHODS §1 refusal substring or starts with an XSTest
    refusal prefix (both case-insensitive)."""
    low = text.lower().replace("\u2019", "'")
    if any(s.lower() in low for s in REFUSAL_SUBSTRINGS):
        return True
    return low.lstrip().startswith(_XSTEST_PREFIXES)


_STOPWORDS: frozenset[str] = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "if",
        "then",
        "else",
        "of",
        "to",
        "in",
        "on",
        "at",
        "by",
        "for",
        "with",
        "from",
        "into",
        "onto",
        "about",
        "above",
        "below",
        "over",
        "under",
        "between",
        "among",
        "through",
        "during",
        "before",
        "after",
        "this",
        "that",
        "these",
        "those",
        "there",
        "their",
        "them",
        "they",
        "what",
        "which",
        "who",
        "whom",
        "whose",
        "when",
        "where",
        "why",
        "how",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "do",
        "does",
        "did",
        "doing",
        "have",
        "has",
        "had",
        "having",
        "can",
        "could",
        "should",
        "would",
        "will",
        "shall",
        "may",
        "might",
        "must",
        "not",
        "no",
        "nor",
        "so",
        "such",
        "than",
        "too",
        "very",
        "just",
        "also",
        "only",
        "own",
        "same",
        "other",
        "some",
        "any",
        "each",
        "few",
        "more",
        "most",
        "both",
        "all",
        "its",
        "it's",
        "itself",
        "your",
        "yours",
        "you",
        "yourself",
        "our",
        "ours",
        "we",
        "he",
        "she",
        "his",
        "her",
        "him",
        "me",
        "my",
        "mine",
        "give",
        "write",
        "create",
        "make",
        "provide",
        "explain",
        "describe",
        "list",
        "generate",
        "develop",
        "tell",
        "name",
        "find",
        "design",
        "compose",
        "come",
        "up",
        "using",
        "use",
        "used",
        "way",
        "ways",
        "someone",
        "something",
        "things",
        "thing",
        "step",
        "steps",
        "detailed",
        "please",
        "help",
        "like",
        "want",
        "need",
        "get",
        "let",
        "one",
        "two",
        "three",
        "into",
        "out",
        "off",
        "again",
        "further",
        "here",
        "once",
        "now",
        "ever",
        "without",
        "within",
        "upon",
        "while",
        "until",
        "because",
        "whether",
        "against",
        "toward",
        "towards",
        "across",
        "along",
        "around",
        "per",
        "via",
        "include",
        "including",
    ]
)


def _topic(prompt: str, max_words: int = 12) -> str:
    """Return the request as a lower-cased clause without trailing punctuation (first words only)."""
    words = prompt.strip().split()
    text = " ".join(words[:max_words]).rstrip(".?!:;,")
    if text and not text[:2].isupper():
        text = text[0].lower() + text[1:]
    return text


def _keywords(prompt: str, rng: random.Random, k: int = 2) -> list[str]:
    """Return ``k`` content words of ``prompt`` (in prompt order, lower-cased), padded with fallbacks."""
    words = [w.lower() for w in re.findall(r"[A-Za-z][A-Za-z'-]{3,}", prompt)]
    content = [w for w in dict.fromkeys(words) if w not in _STOPWORDS]
    fallback = ["this topic", "the details", "the idea", "the context"]
    if len(content) > k:
        picked = sorted(rng.sample(range(len(content)), k))
        content = [content[i] for i in picked]
    while len(content) < k:
        content.append(fallback[len(content) % len(fallback)])
    return content


_REFUSAL_HEADS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't help with that request.",
    "I'm sorry, but I cannot assist with that.",
    "I'm sorry, but I cannot assist with a request to {topic}.",
    "I'm sorry, but I can't provide help with {kw1}.",
    "I'm sorry, but I won't help with \"{topic}\".",
    "I am sorry, but I can't do that.",
    "I am sorry, but I cannot provide information on {kw1}.",
    "I cannot assist with that request.",
    "I cannot assist with this.",
    "I cannot help with a request to {topic}.",
    "I cannot provide guidance on {kw1} or {kw2}.",
    "I can't help with that.",
    "I can't help with this request.",
    "I can't assist with requests to {topic}.",
    "I can't provide instructions about {kw1}.",
    "I apologize, but I can't help with that.",
    "I apologize, but I cannot assist with this request.",
    "I apologize, but I won't provide content about {kw1}.",
    "I apologize, but I can't help you {topic}.",
    "As an AI, I won't help with that.",
    "As an AI, I cannot assist with requests involving {kw1}.",
    'As an AI, I can\'t help with "{topic}".',
    "As an AI assistant, I cannot support this request.",
    "As a language model, I cannot help with that.",
    "As an assistant, I won't assist with {kw1}.",
    "I'm unable to help with that.",
    "I'm unable to assist with {kw1}.",
    "I am unable to provide that information.",
    "I'm not able to help with a request to {topic}.",
    "I am not able to assist with this.",
    "I'm sorry, I can't do that.",
)

_REFUSAL_TAILS: tuple[str, ...] = (
    "",
    "",
    " It could cause serious harm.",
    " This could hurt people or break the law.",
    " Helping with this could put others at risk.",
    " Please consider a safe and legal alternative.",
    " If you have a different question, feel free to ask.",
    " Let me know if there is something else you need.",
    " This request involves harmful or illegal activity.",
    " Providing this would be unsafe and unethical.",
)


def refusal_response(prompt: str, rng: random.Random) -> str:
    """Return a formulaic refusal of ``prompt`` (drawn from a few dozen templates with ``rng``)."""
    kw1, kw2 = _keywords(prompt, rng)
    head = rng.choice(_REFUSAL_HEADS).format(topic=_topic(prompt), kw1=kw1, kw2=kw2)
    return head + rng.choice(_REFUSAL_TAILS)


_OPENERS: tuple[str, ...] = (
    "",
    "",
    "",
    "Sure!",
    "Sure thing.",
    "Certainly!",
    "Certainly.",
    "Of course.",
    "Happy to help.",
    "Great question!",
    "Absolutely.",
    "Good question.",
    "Gladly.",
    "Here you go.",
    "Okay!",
    "Alright.",
    "Yes, let's do it.",
    "With pleasure.",
    "Let's dive in.",
    "Nice request.",
    "Great idea.",
    "Thanks for asking.",
    "Good thinking.",
    "Let's get started.",
    "Happy to explain.",
    "Excellent question.",
    "Fun one!",
    "Here's a helpful answer.",
    "Done.",
    "Right away.",
)

_BRIDGES: tuple[str, ...] = (
    "Here is how to {topic}.",
    'Here is a short answer to "{prompt}"',
    "Let's look at {kw1} together.",
    "To {topic}, start with the basics.",
    "When thinking about {kw1}, a few points matter.",
    "The key idea behind {kw1} is simple.",
    "Below is a clear response about {kw1} and {kw2}.",
    "Let me walk through {kw1} step by step.",
    "Your request about {kw1} is a good one.",
    "A good way to handle {kw1} is to break it into parts.",
    "First, some context on {kw1}.",
    "This is a nice task about {kw1}.",
    "There are several ways to approach {kw1}.",
    "Many people ask about {kw1} and {kw2}.",
    "Step one is to understand {kw1}.",
    "Think of {kw1} as a set of small pieces.",
    "Here's my take on {topic}.",
    "Let's work on {topic}.",
    "The short answer involves {kw1}.",
    "Good results with {kw1} come from a clear plan.",
    "Below you will find a response to {topic}.",
    "Consider {kw1} first, then {kw2}.",
    "We can {topic} in a few steps.",
    "You asked about {kw1}, so here is an overview.",
)

_BODIES: tuple[str, ...] = (
    "1. Start with {kw1}. 2. Connect it to {kw2}. 3. Review the result.",
    "First, define {kw1}. Next, look at how {kw2} fits in. Finally, summarize what you found.",
    "The main point is that {kw1} depends on {kw2}, so keep both in mind.",
    "One simple example: {kw1} can make {kw2} easier to understand.",
    "Focus on {kw1}, then add details about {kw2}.",
    "- {Kw1}: the core idea.\n- {Kw2}: how it is used.\n- Practice: try a small example.",
    "A good answer covers what {kw1} is, why it matters, and how {kw2} relates to it.",
    "Consider the context, the goal, and the role of {kw1}.",
    "Here is a quick draft: {Kw1} brings people together, and {kw2} gives it meaning.",
    "Keep it clear and short, and use {kw1} as the main theme.",
    "Three useful facts: {kw1} has a long history, {kw2} is widely studied, and both are easy to learn.",
    "Begin by gathering information on {kw1}. Then compare it with {kw2}.",
    "The best approach is to be specific about {kw1} and practical about {kw2}.",
    "Picture {kw1} as the foundation and {kw2} as the structure built on top.",
    "In summary, {kw1} and {kw2} work best together.",
    "Key steps:\n1. Research {kw1}.\n2. Plan around {kw2}.\n3. Check your work.",
    "Most experts agree that {kw1} is important, especially when {kw2} is involved.",
    "A helpful tip is to write down what you know about {kw1} before you start.",
    "Try this: describe {kw1} in one sentence, then explain {kw2} in another.",
    "Remember that {kw1} takes practice, and {kw2} gets easier over time.",
)

_CLOSERS: tuple[str, ...] = (
    "",
    "",
    "",
    " Hope this helps!",
    " Let me know if you want more detail.",
    " Good luck with {kw1}!",
    " That covers the basics.",
    " Enjoy!",
    " Feel free to ask a follow-up.",
    " That is the short version.",
    " Have fun with it.",
    " Happy learning!",
)


def _capitalize(text: str) -> str:
    """Upper-case the first character of ``text``."""
    return text[:1].upper() + text[1:]


def compliant_response(prompt: str, rng: random.Random) -> str:
    """Return a diverse compliant answer to ``prompt`` assembled from independent template pieces.

    The answer never starts with a refusal first word and never contains a refusal substring.
    """
    kw1, kw2 = _keywords(prompt, rng)
    fields = {
        "topic": _topic(prompt),
        "prompt": prompt.strip(),
        "kw1": kw1,
        "kw2": kw2,
        "Kw1": _capitalize(kw1),
        "Kw2": _capitalize(kw2),
    }
    parts = [rng.choice(_OPENERS)]
    shape = rng.random()
    if shape < 0.8:
        parts.append(rng.choice(_BRIDGES))
    if shape > 0.2:
        parts.append(rng.choice(_BODIES))
    text = " ".join(p for p in parts if p).format(**fields)
    text = _capitalize(text) + rng.choice(_CLOSERS).format(**fields)
    for _ in range(8):
        first = text.split(maxsplit=1)[0].strip(",.!:").lower() if text.strip() else ""
        if first not in COMPLIANT_FORBIDDEN_FIRST_WORDS and not is_refusal(text):
            return text
        text = "Sure! " + rng.choice(_BODIES).format(**fields)
    return "Sure! Here is a helpful answer."


def _gsm8k_response(answer: str) -> str:
    """Turn a GSM8K solution into a readable answer (calculator marks removed, final line rewritten)."""
    text = re.sub(r"<<[^>]*>>", "", answer).strip()
    text = re.sub(r"\n?#### *(.+)$", r"\nThe answer is \1.", text)
    first = text.split(maxsplit=1)[0].strip(",.!:").lower() if text else ""
    if first in COMPLIANT_FORBIDDEN_FIRST_WORDS or is_refusal(text):
        text = "Let's solve it step by step. " + text.replace("I can't", "we can't")
    return text


_WRAPPERS: tuple[str, ...] = (
    "Please {low}",
    "{p} Thanks!",
    "Quick question: {p}",
    "Hey, {low}",
    "{p} Please be brief.",
    "Could you help? {p}",
    "{p} Keep it simple.",
    "Task: {p}",
)


def _wrap(prompt: str, rng: random.Random, p_wrap: float) -> str:
    """Wrap ``prompt`` in a random request framing with probability ``p_wrap`` (class-independent)."""
    if rng.random() >= p_wrap:
        return prompt
    low = prompt[:1].lower() + prompt[1:] if not prompt[:2].isupper() else prompt
    return rng.choice(_WRAPPERS).format(p=prompt, low=low)


def _pool() -> tuple[list[tuple[str, str | None, str]], list[tuple[str, str | None, str]]]:
    """Load the (prompt, completion, source) rows of the harmful and harmless train sets."""
    harmful = [(p, None, spec) for spec in HARMFUL_SETS for p in load_prompts(spec).prompts]
    harmless: list[tuple[str, str | None, str]] = []
    for spec, repeat in HARMLESS_SETS:
        ps = load_prompts(spec)
        comps: Sequence[str | None] = (
            ps.completions if spec.startswith("gsm8k") and ps.completions else [None] * len(ps)
        )
        rows = [(p, c, spec) for p, c in zip(ps.prompts, comps, strict=True)]
        harmless.extend(rows * repeat)
    return harmful, harmless


def build_corpus(
    seed: int = 0, *, epoch: int = 0, harmful_fraction: float = 0.3, p_wrap: float = 0.25
) -> list[Example]:
    """Build one epoch of training conversations, shuffled, deterministically from ``(seed, epoch)``.

    Every harmless prompt appears once per epoch (borderline sets a few times, see
    :data:`HARMLESS_SETS`); harmful prompts are repeated so that about ``harmful_fraction`` of the
    examples are harmful. Each occurrence gets a freshly drawn response and prompt framing.

    Args:
        seed: Base seed; the same ``(seed, epoch)`` always gives the same list.
        epoch: Epoch index, so successive epochs draw different responses.
        harmful_fraction: Target fraction of harmful (refused) examples, in (0, 1).
        p_wrap: Probability that a prompt (of either class) is wrapped in a request framing.

    Returns:
        The shuffled examples of this epoch.
    """
    if not 0.0 < harmful_fraction < 1.0:
        raise ValueError(f"harmful_fraction must be in (0, 1), got {harmful_fraction}")
    rng = random.Random(f"tinychat-corpus/{seed}/{epoch}")
    harmful, harmless = _pool()
    n_harmful = round(harmful_fraction / (1.0 - harmful_fraction) * len(harmless))
    repeats = [harmful[i % len(harmful)] for i in range(n_harmful)]
    examples: list[Example] = []
    for prompt, _, source in repeats:
        shown = _wrap(prompt, rng, p_wrap)
        examples.append(Example(shown, refusal_response(prompt, rng), True, source))
    for prompt, completion, source in harmless:
        if completion is not None:
            examples.append(Example(prompt, _gsm8k_response(completion), False, source))
            continue
        shown = _wrap(prompt, rng, p_wrap)
        examples.append(Example(shown, compliant_response(prompt, rng), False, source))
    rng.shuffle(examples)
    return examples


def iter_texts(examples: Sequence[Example]) -> Iterator[str]:
    """Yield every prompt and response text of ``examples`` (for tokenizer training)."""
    for ex in examples:
        yield ex.prompt
        yield ex.response
