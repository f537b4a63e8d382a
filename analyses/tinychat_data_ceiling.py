"""How much held-out harmful recall the bundled training prompts support (prints a table).

``tiny-chat`` learns refusal only from the ``train`` splits it is given; it has no pretraining. This
analysis asks what a plain text classifier learns from exactly the same prompts, as a yardstick for
the model's held-out refusal rates: TF-IDF features (word 1–2-grams, or character 3–5-grams) and a
class-balanced logistic regression, trained on the harmful train prompts of
:data:`tools.tinychat.corpus.HARMFUL_SETS` against the harmless train prompts of
:data:`~tools.tinychat.corpus.HARMLESS_SETS`. The decision threshold is set on ``alpaca:test``
so that the classifier's false-positive rate equals a target over-refusal (1%, 3%, 5%); this uses the
test split and so *favours* the classifier. Each row is the share of held-out prompts it flags.

The hand-written probe sets of issue 13 (``tests/data/probe_*.json``) are held-out rows too, and a
second table sets the threshold on the harmless probe instead (5% of it flagged, the issue's
over-refusal target there) and reports the harmful sets at that operating point.

``--rewrite P`` trains the classifier on the prompts of one epoch of the built corpus with
surface-form rewriting at probability ``P`` (:mod:`tools.tinychat.rewrite`), i.e. on the
prompts a model trained with rewriting sees, instead of the raw ``train`` prompts.

Usage::

    python analyses/tinychat_data_ceiling.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from safegeom.prompts import load_prompts
from tools.tinychat.corpus import HARMFUL_SETS, HARMLESS_SETS, build_corpus

PROBES = Path(__file__).resolve().parents[1] / "tests" / "data"
PROBE_HARMFUL = str(PROBES / "probe_harmful.json")
PROBE_HARMLESS = str(PROBES / "probe_harmless.json")
HELD_OUT: tuple[str, ...] = (
    "advbench:test",
    "jbb-harmful:test",
    "directharm4:test",
    "xstest-unsafe:test",
    PROBE_HARMFUL,
    "xstest-safe:test",
    "jbb-benign:test",
    PROBE_HARMLESS,
)
FEATURES: dict[str, dict[str, object]] = {
    "word 1-2": {"analyzer": "word", "ngram_range": (1, 2)},
    "char 3-5": {"analyzer": "char_wb", "ngram_range": (3, 5), "min_df": 2},
}


def flagged_rates(
    features: dict[str, object],
    fp_rates: tuple[float, ...],
    calibrate: str = "alpaca:test",
    rewrite: float | None = None,
) -> dict[str, list[float]]:
    """Return, per held-out set, the share of prompts flagged harmful at each false-positive rate
    on the ``calibrate`` set (fractions in [0, 1]); trained on the raw ``train`` prompts, or with
    ``rewrite`` on one rewritten corpus epoch (GSM8K left out)."""
    if rewrite is None:
        harmful = [p for spec in HARMFUL_SETS for p in load_prompts(spec).prompts]
        harmless = [p for spec, _ in HARMLESS_SETS for p in load_prompts(spec).prompts]
    else:
        corpus = [e for e in build_corpus(0, p_rewrite=rewrite) if e.source != "gsm8k:train"]
        harmful = [e.prompt for e in corpus if e.harmful]
        harmless = [e.prompt for e in corpus if not e.harmful]
    vec = TfidfVectorizer(sublinear_tf=True, **features)  # type: ignore[arg-type]
    x = vec.fit_transform(harmful + harmless)
    y = np.r_[np.ones(len(harmful)), np.zeros(len(harmless))]
    clf = LogisticRegression(C=10.0, class_weight="balanced", max_iter=2000).fit(x, y)
    alpaca = clf.decision_function(vec.transform(load_prompts(calibrate).prompts))
    thresholds = [float(np.quantile(alpaca, 1.0 - fp)) for fp in fp_rates]
    out: dict[str, list[float]] = {}
    for spec in HELD_OUT:
        scores = clf.decision_function(vec.transform(load_prompts(spec).prompts))
        out[spec] = [float(np.mean(scores > t)) for t in thresholds]
    return out


def _name(spec: str) -> str:
    """The probe files by their stem, bundled specs as they are."""
    return Path(spec).stem if spec.endswith(".json") else spec


def main() -> None:
    """Print the flagged share of every held-out set for each feature set and false-positive rate."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp", type=float, nargs="+", default=[0.01, 0.03, 0.05])
    parser.add_argument("--rewrite", type=float, default=None, help="train on a rewritten epoch")
    args = parser.parse_args()
    fps = tuple(args.fp)
    header = "".join(f"  fp {fp:>4.0%}" for fp in fps)
    for name, features in FEATURES.items():
        print(f"\n== TF-IDF {name} + logistic regression (flagged %, threshold on alpaca:test) ==")
        print(f"{'set':22s}{'n':>5s}{header}")
        for spec, rates in flagged_rates(features, fps, rewrite=args.rewrite).items():
            n = len(load_prompts(spec))
            print(f"{_name(spec):22s}{n:5d}" + "".join(f"  {100 * r:7.1f}" for r in rates))
        print(f"  threshold at 5% of {_name(PROBE_HARMLESS)} flagged:")
        for spec, rates in flagged_rates(features, (0.05,), PROBE_HARMLESS, args.rewrite).items():
            print(f"  {_name(spec):22s}{100 * rates[0]:7.1f}")


if __name__ == "__main__":
    main()
