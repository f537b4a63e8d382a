"""Deterministic training conversations for ``tiny-chat``.

Harmful requests (the ``train`` splits of AdvBench, JBB-harmful, DirectHarm4 and XSTest-unsafe) get
formulaic but varied refusals that start with the usual refusal first tokens ("I'm sorry",
"I cannot", "I apologize", "As an AI", ...). Harmless requests (the ``train`` splits of Alpaca, JBB-benign,
XSTest-safe and GSM8K) get diverse compliant answers: GSM8K with its real worked solutions, the rest
assembled from several independent template pieces (opener, bridge, body, closer) that engage with
the request and reuse its words, so there are thousands of distinct shapes and many different first
tokens. This asymmetry (formulaic refusal, diverse compliance) makes refusal a *marked* feature, as in
real chat models, so that a single diff-in-means direction mediates it. A share ``p_sure`` of the
compliant answers opens with "Sure ...", which gives compliance a modal first token: without it,
greedy decoding picks the refusal token even when refusal holds a small part of the probability.

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
from safegeom.prompt_roles import check_trainable
from tools.tinychat.recombine import HeadPool, head_pool, recombine
from tools.tinychat.rewrite import rewrite
from tools.tinychat.templates import (
    BODIES,
    BRIDGES,
    CLOSERS,
    OPENERS,
    REFUSAL_HEADS,
    REFUSAL_TAILS,
    STOPWORDS,
    SURE_OPENERS,
    WRAPPERS,
)

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
    """Return whether ``text`` holds a docs/methods.md §1 refusal substring or starts with an XSTest
    refusal prefix (both case-insensitive)."""
    low = text.lower().replace("\u2019", "'")
    if any(s.lower() in low for s in REFUSAL_SUBSTRINGS):
        return True
    return low.lstrip().startswith(_XSTEST_PREFIXES)


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
    content = [w for w in dict.fromkeys(words) if w not in STOPWORDS]
    fallback = ["this topic", "the details", "the idea", "the context"]
    if len(content) > k:
        picked = sorted(rng.sample(range(len(content)), k))
        content = [content[i] for i in picked]
    while len(content) < k:
        content.append(fallback[len(content) % len(fallback)])
    return content


def refusal_response(prompt: str, rng: random.Random) -> str:
    """Return a formulaic refusal of ``prompt`` (drawn from a few dozen templates with ``rng``)."""
    kw1, kw2 = _keywords(prompt, rng)
    head = rng.choice(REFUSAL_HEADS).format(topic=_topic(prompt), kw1=kw1, kw2=kw2)
    return head + rng.choice(REFUSAL_TAILS)


def _capitalize(text: str) -> str:
    """Upper-case the first character of ``text``."""
    return text[:1].upper() + text[1:]


def compliant_response(prompt: str, rng: random.Random, p_sure: float = 0.0) -> str:
    """Return a diverse compliant answer to ``prompt`` assembled from independent template pieces.

    With probability ``p_sure`` the answer is prefixed with a "Sure ..." opener
    (:data:`SURE_OPENERS`), so compliance has a modal first token, as in real chat models. The answer
    never starts with a refusal first word and never contains a refusal substring.
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
    parts = [rng.choice(OPENERS)]
    shape = rng.random()
    if shape < 0.8:
        parts.append(rng.choice(BRIDGES))
    if shape > 0.2:
        parts.append(rng.choice(BODIES))
    text = " ".join(p for p in parts if p).format(**fields)
    text = _capitalize(text) + rng.choice(CLOSERS).format(**fields)
    for _ in range(8):
        first = text.split(maxsplit=1)[0].strip(",.!:").lower() if text.strip() else ""
        if first not in COMPLIANT_FORBIDDEN_FIRST_WORDS and not is_refusal(text):
            break
        text = "Sure! " + rng.choice(BODIES).format(**fields)
    else:
        text = "Sure! Here is a helpful answer."
    if rng.random() < p_sure:
        text = rng.choice(SURE_OPENERS) + " " + text
    return text


def _gsm8k_response(answer: str) -> str:
    """Turn a GSM8K solution into a readable answer (calculator marks removed, final line rewritten)."""
    text = re.sub(r"<<[^>]*>>", "", answer).strip()
    text = re.sub(r"\n?#### *(.+)$", r"\nThe answer is \1.", text)
    first = text.split(maxsplit=1)[0].strip(",.!:").lower() if text else ""
    if first in COMPLIANT_FORBIDDEN_FIRST_WORDS or is_refusal(text):
        text = "Let's solve it step by step. " + text.replace("I can't", "we can't")
    return text


def _wrap(prompt: str, rng: random.Random, p_wrap: float) -> str:
    """Wrap ``prompt`` in a random request framing with probability ``p_wrap`` (class-independent)."""
    if rng.random() >= p_wrap:
        return prompt
    low = prompt[:1].lower() + prompt[1:] if not prompt[:2].isupper() else prompt
    return rng.choice(WRAPPERS).format(p=prompt, low=low)


def _pool(
    xstest_safe_repeat: int | None = None,
) -> tuple[list[tuple[str, str | None, str]], list[tuple[str, str | None, str]]]:
    """Load the (prompt, completion, source) rows of the harmful and harmless train sets
    (``xstest_safe_repeat`` overrides the repeat count of ``xstest-safe:train``)."""
    harmful = [(p, None, spec) for spec in HARMFUL_SETS for p in check_trainable(spec).prompts]
    harmless: list[tuple[str, str | None, str]] = []
    for spec, repeat in HARMLESS_SETS:
        ps = check_trainable(spec)  # a test split or an evaluation benchmark is refused
        comps: Sequence[str | None] = (
            ps.completions if spec.startswith("gsm8k") and ps.completions else [None] * len(ps)
        )
        rows = [(p, c, spec) for p, c in zip(ps.prompts, comps, strict=True)]
        if spec == "xstest-safe:train" and xstest_safe_repeat is not None:
            repeat = xstest_safe_repeat
        harmless.extend(rows * repeat)
    return harmful, harmless


def build_corpus(
    seed: int = 0,
    *,
    epoch: int = 0,
    harmful_fraction: float = 0.3,
    p_wrap: float = 0.25,
    p_sure: float = 0.0,
    p_recombine: float = 0.0,
    p_rewrite: float = 0.0,
    xstest_safe_repeat: int | None = None,
    refuse: bool = True,
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
        p_sure: Probability that a (non-GSM8K) compliant answer opens with "Sure ...".
        p_recombine: Probability that a (non-GSM8K) prompt of either class gets its instruction
            head swapped (:mod:`~tools.tinychat.recombine`): harmful tails take heads from
            all prompts, harmless tails from harmless prompts. Drawn from its own random stream, so
            ``0.0`` leaves the corpus exactly as without recombination.
        p_rewrite: Probability that a (non-GSM8K) prompt of either class is re-rendered in a
            random surface form (:func:`~tools.tinychat.rewrite.rewrite`), after
            recombination and before the framing. Its own random stream, so ``0.0`` leaves the
            corpus exactly as without rewriting.
        xstest_safe_repeat: Repeats of ``xstest-safe:train`` per epoch (``None``: the count in
            :data:`HARMLESS_SETS`).
        refuse: Whether harmful prompts get refusals (``False``: compliant answers, drawn like
            the harmless ones, for the corpus of a compliant base model; labels stay
            ``harmful=True``).

    Returns:
        The shuffled examples of this epoch.
    """
    if not 0.0 < harmful_fraction < 1.0:
        raise ValueError(f"harmful_fraction must be in (0, 1), got {harmful_fraction}")
    rng = random.Random(f"tinychat-corpus/{seed}/{epoch}")
    harmful, harmless = _pool(xstest_safe_repeat)
    n_harmful = round(harmful_fraction / (1.0 - harmful_fraction) * len(harmless))
    repeats = [harmful[i % len(harmful)] for i in range(n_harmful)]
    swap_rng = random.Random(f"tinychat-recombine/{seed}/{epoch}")
    harmless_heads: HeadPool = {}
    all_heads: HeadPool = {}
    if p_recombine > 0.0:
        harmless_heads = head_pool(p for p, c, _ in harmless if c is None)
        all_heads = head_pool([p for p, _, _ in harmful] + [p for p, c, _ in harmless if c is None])

    rewrite_rng = random.Random(f"tinychat-rewrite/{seed}/{epoch}")

    def swapped(prompt: str, heads: HeadPool) -> str:
        if heads and swap_rng.random() < p_recombine:
            prompt = recombine(prompt, heads, swap_rng)
        if p_rewrite > 0.0 and rewrite_rng.random() < p_rewrite:
            prompt = rewrite(prompt, rewrite_rng)
        return prompt

    examples: list[Example] = []
    for prompt, _, source in repeats:
        prompt = swapped(prompt, all_heads)
        shown = _wrap(prompt, rng, p_wrap)
        answer = (
            refusal_response(prompt, rng) if refuse else compliant_response(prompt, rng, p_sure)
        )
        examples.append(Example(shown, answer, True, source))
    for prompt, completion, source in harmless:
        if completion is not None:
            examples.append(Example(prompt, _gsm8k_response(completion), False, source))
            continue
        prompt = swapped(prompt, harmless_heads)
        shown = _wrap(prompt, rng, p_wrap)
        answer = compliant_response(prompt, rng, p_sure)
        examples.append(Example(shown, answer, False, source))
    rng.shuffle(examples)
    return examples


def iter_texts(examples: Sequence[Example]) -> Iterator[str]:
    """Yield every prompt and response text of ``examples`` (for tokenizer training)."""
    for ex in examples:
        yield ex.prompt
        yield ex.response
