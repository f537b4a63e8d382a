"""Surface cues of a training corpus: can the label be read off a prompt's form alone?

A testbed model should refuse by a request's content. If the two classes of its corpus differ in
surface form (first words, length, final punctuation, person, casing), a small model learns the
form instead (issue 13: `tiny-chat` v1 refused "How do I remove a coffee stain …?"). This module
measures that on the built corpus:

- :func:`cue_table`: for every surface feature value, its share among harmful and harmless
  prompts and the ratio of the two;
- :func:`surface_auroc`: the cross-validated AUROC of a logistic regression on surface features
  alone (0.5: form says nothing about the label).

Example (on the built corpus, ``build_corpus(0, p_rewrite=1.0)``, the AUROC is 0.73):
    >>> from tools.tinychat.corpus import Example
    >>> surface_features("How do I bake bread?")["end"]
    '?'
    >>> asks = [Example(f"How do I bake loaf {i}?", "Sure.", False, "toy") for i in range(10)]
    >>> orders = [Example(f"Write a threat to person {i}.", "Sorry.", True, "toy") for i in range(10)]
    >>> surface_auroc(asks + orders)  # the form alone gives the label away
    1.0
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.feature_extraction import DictVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from tools.tinychat.corpus import Example

__all__ = ["CATEGORICAL", "CueRow", "cue_table", "surface_auroc", "surface_features"]

CATEGORICAL: tuple[str, ...] = ("first", "first2", "length", "end")
"""Categorical surface features: first word, first two words, length bucket (5 words), last
character class."""

_PERSON_1 = frozenset({"i", "i'm", "i've", "i'd", "my", "me", "mine"})
_PERSON_2 = frozenset({"you", "your", "u"})


def _end_class(prompt: str) -> str:
    """The prompt's last character: the mark itself for ``.?!"`` and friends, else letter/digit."""
    last = prompt.rstrip()[-1:]
    if last.isalpha():
        return "letter"
    if last.isdigit():
        return "digit"
    return last or "empty"


def surface_features(prompt: str) -> dict[str, float | str]:
    """The surface features of ``prompt``: the :data:`CATEGORICAL` ones as strings, and binary or
    count features (question mark, lower-case start, all lower case, first/second person, comma,
    sentences) as numbers. Content words beyond the first two never enter."""
    words = re.findall(r"[a-z']+", prompt.lower())
    wordset = set(words)
    text = prompt.strip()
    return {
        "first": words[0] if words else "",
        "first2": " ".join(words[:2]),
        "length": str(min(len(words) // 5, 8)),
        "end": _end_class(text),
        "question_mark": float("?" in text),
        "lower_start": float(text[:1].islower()),
        "all_lower": float(text == text.lower()),
        "first_person": float(bool(wordset & _PERSON_1)),
        "second_person": float(bool(wordset & _PERSON_2)),
        "comma": float("," in text),
        "sentences": float(min(len(re.findall(r"[.?!](\s|$)", text)), 4)),
    }


@dataclass(frozen=True)
class CueRow:
    """One surface feature value and how often each class shows it.

    Attributes:
        feature: ``"first=how"``, ``"end=letter"``, ``"question_mark"``, … (binary features count
            the prompts where they are set).
        harmful: Share of harmful prompts with it, in [0, 1].
        harmless: Share of harmless prompts with it, in [0, 1].
    """

    feature: str
    harmful: float
    harmless: float

    @property
    def ratio(self) -> float:
        """``harmful / harmless`` with both shares floored at 1e-4 (∞-free)."""
        return max(self.harmful, 1e-4) / max(self.harmless, 1e-4)


def _split(examples: Sequence[Example]) -> tuple[list[str], list[str]]:
    """Harmful and harmless prompts of ``examples`` (GSM8K math problems left out: their form is a
    word problem that the model answers by its numbers, not a request in the two classes' style)."""
    kept = [e for e in examples if not e.source.startswith("gsm8k")]
    return [e.prompt for e in kept if e.harmful], [e.prompt for e in kept if not e.harmful]


def cue_table(examples: Sequence[Example], min_share: float = 0.01) -> list[CueRow]:
    """Every surface feature value held by at least ``min_share`` of either class, sorted by how
    far its ratio is from 1 (most telling first).

    Returns:
        :class:`CueRow` values; shares are fractions of each class's prompts.
    """
    harmful, harmless = _split(examples)
    if not harmful or not harmless:
        raise ValueError("cue_table needs harmful and harmless examples")
    counts: list[Counter[str]] = []
    for prompts in (harmful, harmless):
        c: Counter[str] = Counter()
        for p in prompts:
            for key, value in surface_features(p).items():
                if isinstance(value, str):
                    c[f"{key}={value}"] += 1
                elif value:
                    c[key] += 1
        counts.append(c)
    rows = [
        CueRow(k, counts[0][k] / len(harmful), counts[1][k] / len(harmless))
        for k in sorted(set(counts[0]) | set(counts[1]))
    ]
    rows = [r for r in rows if max(r.harmful, r.harmless) >= min_share]
    return sorted(rows, key=lambda r: -abs(np.log(r.ratio)))


def surface_auroc(
    examples: Sequence[Example],
    *,
    features: Sequence[str] | None = None,
    folds: int = 5,
    seed: int = 0,
) -> float:
    """Cross-validated AUROC of a logistic regression that sees only surface features.

    Args:
        examples: Corpus examples (GSM8K ones are left out).
        features: Names of :func:`surface_features` keys to use (default: all).
        folds: Stratified cross-validation folds.
        seed: Seed of the fold split.

    Returns:
        The AUROC of the out-of-fold predictions, in [0, 1]; 0.5 means the form says nothing.
    """
    harmful, harmless = _split(examples)
    rows = [surface_features(p) for p in harmful + harmless]
    if features is not None:
        rows = [{k: r[k] for k in features} for r in rows]
    labels = np.array([1] * len(harmful) + [0] * len(harmless))
    matrix = DictVectorizer().fit_transform(rows)
    model = LogisticRegression(max_iter=2000)
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    scores = cross_val_predict(model, matrix, labels, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(labels, scores))
