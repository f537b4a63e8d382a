"""Attacks for fixed-source transfer (docs/methods.md §11): GCG, AutoDAN-style search, prefilling.

Each attack is a module with a frozen config and ``attack(lm, behaviours, targets, config)``
returning an :class:`AttackSet`, adversarial prompts with provenance that every prompt-taking
function accepts (token ids replayed exactly where the tokenizer matches).
"""

from safegeom.attacks.attack_set import AttackRecord, AttackSet, load_attack_set, tokenizer_hash
from safegeom.attacks.runner import AttackOptions, judge_records, run_attack

__all__ = [
    "AttackOptions",
    "AttackRecord",
    "AttackSet",
    "judge_records",
    "load_attack_set",
    "run_attack",
    "tokenizer_hash",
]
