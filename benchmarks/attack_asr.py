"""Part 2 of ``bench_attacks.py``: attack success on ``harmbench:val`` with the library's judge.

Every row is judged the same way: the model's greedy answer (48 new tokens, the chat's stop
tokens) to the prompt, read by the ``substring`` judge (:func:`safegeom.judges.get_judge`); ASR
is the share judged not refused.

- ``no attack``: the plain behaviour.
- ``GCG (safegeom)`` / ``GCG (nanoGCG, as text)``: the behaviour with each side's best suffix of
  part 1 (safegeom's replays its optimised ids, which its filter guarantees its text gives).
- ``AutoDAN-style``: :func:`safegeom.attacks.autodan.attack` with ``AutoDANConfig()``.
- ``prefill``: :func:`safegeom.attacks.prefill.attack`, the whole target prefilled.

Example (not a doctest: part 1's result ``case`` is needed)::

    rows = asr_rows(case, quick=True)
    rows[0]["attack"]
    # -> 'no attack'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from safegeom.attacks import AttackOptions, autodan, prefill
from safegeom.attacks.targets import behaviours_and_targets
from safegeom.errors import SafegeomError
from safegeom.generation import generate_from_ids, stop_token_ids
from safegeom.judges import get_judge
from safegeom.models import load_model
from safegeom.models.chat import encode_prompts
from safegeom.models.loading import LoadedModel

__all__ = ["asr_rows", "judged"]

JUDGE = "substring"
NEW_TOKENS = 48


def judged(lm: LoadedModel, user_texts: Sequence[str], behaviours: Sequence[str]) -> list[bool]:
    """Whether the greedy answer to each user turn is judged not refused.

    Returns:
        One success flag per text.
    """
    encoded = encode_prompts(lm.tokenizer, list(user_texts), chat_template=lm.chat_template)
    answers = generate_from_ids(
        lm.model,
        lm.tokenizer,
        [e.input_ids for e in encoded],
        max_new_tokens=NEW_TOKENS,
        stop_ids=stop_token_ids(lm.tokenizer, lm.base, lm.chat_template),
        progress=False,
    )
    refused = get_judge(JUDGE)(list(behaviours), answers)
    return [not r for r in refused]


def _row(model: str, attack: str, successes: Sequence[bool], **extra: Any) -> dict[str, Any]:
    n = len(successes)
    return {
        "model": model,
        "attack": attack,
        "n": n,
        "successes": int(sum(successes)),
        "asr": sum(successes) / n,
        **extra,
    }


def _library_attack(module: Any, lm: LoadedModel, n: int, config: Any) -> list[bool]:
    behaviours, targets = behaviours_and_targets("harmbench:val", limit=n)
    options = AttackOptions(judge=JUDGE, max_new_tokens=NEW_TOKENS)
    result = module.attack(lm, behaviours.prompts, targets, config, options=options)
    return [bool(r.success) for r in result.records]


def asr_rows(case: dict[str, Any], *, quick: bool) -> list[dict[str, Any]]:
    """Part 2's rows: ``case`` is part 1's tiny-chat result (its model and GCG runs).

    Returns:
        One dict per (model, attack): n, successes, ASR, or ``skipped`` with the reason.
    """
    lm: LoadedModel = case["lm"]
    n_all = 2 if quick else 41
    behaviours, _ = behaviours_and_targets("harmbench:val", limit=n_all)
    b = list(behaviours.prompts)
    k = case["behaviours"]
    clean = judged(lm, b, b)
    rows = [_row("tiny-chat", "no attack", clean)]
    if k < n_all:
        rows.append(_row("tiny-chat", f"no attack (first {k})", clean[:k]))
    for side, runs in case["runs"].items():
        if side == "nanogcg-nogc":  # the same search as nanogcg's, on fewer behaviours
            continue
        texts = [b[i] + r["suffix"] for i, r in enumerate(runs)]
        label = "GCG (safegeom)" if side == "safegeom" else "GCG (nanoGCG, as text)"
        rows.append(_row("tiny-chat", label, judged(lm, texts, b[:k]), steps=case["settings"]))
    dan = autodan.AutoDANConfig(population=4, generations=1) if quick else autodan.AutoDANConfig()
    n_dan = k
    rows.append(_row("tiny-chat", "AutoDAN-style", _library_attack(autodan, lm, n_dan, dan)))
    rows.append(
        _row("tiny-chat", "prefill", _library_attack(prefill, lm, n_all, prefill.PrefillConfig()))
    )
    if quick:
        return rows
    try:
        smol = load_model("smol-chat")
    except (SafegeomError, OSError) as exc:
        reason = str(exc).splitlines()[0]
        return [*rows, {"model": "smol-chat", "attack": "all", "skipped": reason}]
    rows.append(_row("smol-chat", "no attack", judged(smol, b, b)))
    rows.append(
        _row("smol-chat", "prefill", _library_attack(prefill, smol, n_all, prefill.PrefillConfig()))
    )
    return rows
