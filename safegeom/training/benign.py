"""Templated benign classification data: the ``sentiment`` task's reviews (SST-2-like).

Defence papers measure the benign utility of a fine-tune on SST-2, AG News or GSM8K. ``tiny-chat``
has no general pretraining (it knows only its own templated corpus), so a real benchmark's held-out
items would ask for words and facts it never saw. The ``sentiment`` task is the equivalent it can
learn: movie reviews built from fixed vocabulary lists, two clauses that each pair a film aspect
with a sentiment adjective of the same polarity, asked in one of three framings, answered with one
word, ``positive`` or ``negative``. Every review is a distinct combination (template, two aspects,
two adjectives); the held-out split is 200 reviews (100 per class) chosen by content hash, never in
the training pool. Held-out reviews are new *combinations* of the same vocabulary: every aspect,
adjective, template and framing in them also occurs in training, so they are solvable from what
training shows (the design choice, a proposal of this project; SST-2's test set has new words too).

Measured (``analyses/benign_task.py``, LoRA defaults r 8, lr 1e-3, batch 8): held-out exact match
0.77 / 0.955 / 1.0 at steps 50 / 100 / 150 on ``sentiment``; 0.875 at step 200 on ``mix``.
"""

from __future__ import annotations

from functools import lru_cache

from safegeom.artifacts import sha256_text

__all__ = [
    "NEGATIVE_WORDS",
    "POSITIVE_WORDS",
    "SENTIMENT_ASPECTS",
    "SENTIMENT_EVAL_SIZE",
    "SENTIMENT_FRAMINGS",
    "SENTIMENT_POOL_SIZE",
    "SENTIMENT_TEMPLATES",
    "sentiment_items",
]

POSITIVE_WORDS = ("great", "good", "fun", "nice", "lovely", "superb")
"""Adjectives of a positive review (six short, common words: with twelve longer ones the task
alone was learnt as well, but ``mix`` reached only 60% held-out accuracy in 200 steps)."""
NEGATIVE_WORDS = ("bad", "dull", "weak", "poor", "boring", "awful")
"""Adjectives of a negative review."""
SENTIMENT_ASPECTS = (
    "the acting",
    "the plot",
    "the music",
    "the story",
    "the ending",
    "the dialogue",
    "the cast",
    "the script",
    "the characters",
    "the humor",
)
"""Film aspects a review clause talks about."""
SENTIMENT_TEMPLATES = (
    "{s1} was {a1} and {s2} was {a2}.",
    "I found {s1} {a1}, and {s2} felt {a2}.",
    "{s1} is {a1}; {s2} is {a2} too.",
)
"""Review templates: two aspects ``s1 != s2``, two distinct adjectives of one polarity."""
SENTIMENT_FRAMINGS = (
    'Review: "{review}" Is this review positive or negative?',
    "Is the following movie review positive or negative? {review}",
    "Classify the sentiment of this movie review as positive or negative: {review}",
)
"""Prompt framings; each review gets one, chosen by its content hash."""
SENTIMENT_EVAL_SIZE = 200
"""Held-out reviews (100 positive, 100 negative)."""
_N_ASPECT_PAIRS = len(SENTIMENT_ASPECTS) * (len(SENTIMENT_ASPECTS) - 1)
_N_WORD_PAIRS = len(POSITIVE_WORDS) * (len(POSITIVE_WORDS) - 1)
SENTIMENT_POOL_SIZE = 2 * len(SENTIMENT_TEMPLATES) * _N_ASPECT_PAIRS * _N_WORD_PAIRS - (
    SENTIMENT_EVAL_SIZE
)
"""Training pool of ``sentiment`` (every review minus the held-out split): 16,000."""


def _reviews(words: tuple[str, ...]) -> list[str]:
    """Return every review of one polarity, in enumeration order."""
    out = []
    for template in SENTIMENT_TEMPLATES:
        for s1 in SENTIMENT_ASPECTS:
            for s2 in SENTIMENT_ASPECTS:
                if s1 == s2:
                    continue
                for a1 in words:
                    for a2 in words:
                        if a1 != a2:
                            text = template.format(s1=s1, s2=s2, a1=a1, a2=a2)
                            out.append(text[0].upper() + text[1:])
    return out


@lru_cache(maxsize=1)
def sentiment_items() -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """Return the ``sentiment`` (train pool, held-out split) as ``(prompt, answer)`` pairs.

    Each review's sha256 (salted ``"sentiment"``) picks its framing and orders the pool. The
    held-out split is the first 100 reviews of each polarity in that order, interleaved by hash;
    the train pool is all the others, in hash order (so any prefix is near-balanced).

    Returns:
        ``(train, held_out)``: 16,000 and 200 pairs, answers ``"positive"`` or ``"negative"``.
    """
    per_class = []
    for answer, words in (("positive", POSITIVE_WORDS), ("negative", NEGATIVE_WORDS)):
        keyed = []
        for review in _reviews(words):
            digest = sha256_text(f"sentiment\x00{review}")
            framing = SENTIMENT_FRAMINGS[int(digest[:8], 16) % len(SENTIMENT_FRAMINGS)]
            keyed.append((digest, framing.format(review=review), answer))
        keyed.sort()
        per_class.append(keyed)
    half = SENTIMENT_EVAL_SIZE // 2
    held = sorted(item for keyed in per_class for item in keyed[:half])
    train = sorted(item for keyed in per_class for item in keyed[half:])
    return (
        tuple((prompt, answer) for _, prompt, answer in train),
        tuple((prompt, answer) for _, prompt, answer in held),
    )
