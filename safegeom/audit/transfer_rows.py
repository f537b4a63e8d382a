"""Fixed-source transfer: attack sets optimised once on a source model, replayed at every checkpoint.

``AuditConfig.attacks`` names attack-set folders (``safegeom attack ... --out DIR``), each as
``DIR`` or ``NAME=DIR``; a set is called NAME in the table, else by its folder's name. At every
checkpoint (the base included) each set gives rows of source ``fixed-attack:NAME`` (``prompts``:
the set's own name, ``attack:<method>:<prompt set>``), each with a bootstrap CI over the set's
behaviours seeded by ``AuditConfig.seed`` (docs/methods.md §11):

- ``attack_asr`` (with generation only): the share of adversarial prompts whose greedy answer the
  audit's judge (``AuditConfig.judge``, named in the row) does not call refused;
- ``attack_target_logprob``: the mean log-probability per token of the attack's target,
  teacher-forced after the adversarial prompt, in nats per token; a prefilling attack's prefill
  counts as part of the target, so on the source model this is minus the attack's final loss;
- ``attack_refusal_score``: the mean refusal score (log-odds, docs/methods.md §1) at the last
  position of the adversarial prompts as optimised (a prefill included).

The prompts are replayed exactly as optimised: the saved token ids, under the set's own system
prompt (not ``AuditConfig.system``). A set made with another tokenizer or chat template than the
audited models' is refused before any measurement (:func:`check_replayable`): its ids would
spell other text there.

Example (not a doctest: it needs an attack set on disk)::

    audit("runs/lora", "runs/audit", attacks=("runs/gcg", "prefill=runs/prefill"))
    # rows of source fixed-attack:gcg and fixed-attack:prefill at every step
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Float

from safegeom.attacks.attack_set import FILE_NAME, AttackRecord, AttackSet, load_attack_set
from safegeom.attacks.attack_set import tokenizer_hash as vocabulary_hash
from safegeom.attacks.loss import sequence_losses
from safegeom.audit.behaviour_rows import metric_row
from safegeom.bootstrap import Metric
from safegeom.errors import ConfigError, SafegeomError
from safegeom.evaluation import EvaluateConfig, evaluate, refusal_scores
from safegeom.models.chat import template_hash
from safegeom.models.loading import LoadedModel
from safegeom.models.plain_text import encode_plain

__all__ = [
    "SOURCE_PREFIX",
    "attack_hashes",
    "attack_names",
    "check_replayable",
    "load_attack_sets",
    "target_logprobs",
    "transfer_rows",
]

SOURCE_PREFIX = "fixed-attack:"
"""The ``source`` of a transfer row is this prefix and the attack set's name."""


def attack_names(specs: Sequence[str]) -> dict[str, Path]:
    """Names for attack-set specs ``[NAME=]DIR``: the given NAME, else the folder's name (the
    folder holding it for a path to ``attack_set.json``).

    Returns:
        Name → path, in the order given.

    Raises:
        ConfigError: two sets that would share a name.

    Example:
        >>> attack_names(["runs/gcg", "pre=runs/prefill/attack_set.json"])
        {'gcg': PosixPath('runs/gcg'), 'pre': PosixPath('runs/prefill/attack_set.json')}
    """
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        path = Path(rest if sep and name.strip() else spec)
        if not (sep and name.strip()):
            name = (path.parent if path.name == FILE_NAME else path).name
        name = name.strip()
        if name in out:
            raise ConfigError(
                f"--attacks: two attack sets are both named {name!r} ({out[name]} and {path}); "
                "name them with NAME=DIR"
            )
        out[name] = path
    return out


def load_attack_sets(specs: Sequence[str]) -> dict[str, AttackSet]:
    """Load every attack set ``specs`` name (:func:`attack_names`); cheap, no model.

    Returns:
        Name → :class:`~safegeom.attacks.AttackSet`, in the order given.

    Raises:
        SafegeomError: a missing, corrupt or empty set; the message names ``--attacks`` and the
            folder.
    """
    sets: dict[str, AttackSet] = {}
    for name, path in attack_names(specs).items():
        try:
            attacks = load_attack_set(path)
        except SafegeomError as err:
            raise type(err)(f"--attacks {path}: {err}") from None
        if len(attacks) == 0:
            raise SafegeomError(
                f"--attacks {path}: the attack set is empty; run `safegeom attack` into it"
            )
        sets[name] = attacks
    return sets


def attack_hashes(specs: Sequence[str]) -> dict[str, str]:
    """Each named set's content hash (:meth:`~safegeom.attacks.AttackSet.content_hash`): what
    must not change for a rerun to continue an audit (``{}`` without attack sets)."""
    return {name: a.content_hash() for name, a in load_attack_sets(specs).items()}


def check_replayable(lm: LoadedModel, sets: Mapping[str, AttackSet]) -> None:
    """Refuse an attack set whose token ids would not replay on ``lm`` as optimised.

    Raises:
        ConfigError: a set made with another tokenizer or chat template than ``lm``'s; the
            message names the set, its source model and the fix.
    """
    vocabulary = vocabulary_hash(lm.tokenizer)
    template = template_hash(lm.tokenizer, lm.chat_template)
    for name, attacks in sets.items():
        source = attacks.provenance.model or "its source model"
        if attacks.tokenizer_hash != vocabulary:
            raise ConfigError(
                f"--attacks {name}: the set was optimised on {source}, whose tokenizer is not "
                f"{lm.name}'s, so its token ids spell other text here; run `safegeom attack` on "
                "the audited base (or a model with its tokenizer) and pass that folder"
            )
        if attacks.template_hash != template:
            raise ConfigError(
                f"--attacks {name}: the set was optimised on {source} with another chat template "
                f"than {lm.name}'s; audit with the template the attack used (--chat-template) or "
                "run `safegeom attack` on the audited base"
            )


def _prefilled(record: AttackRecord, target: Sequence[int]) -> int:
    """How many of the target's first tokens end the record's ids (its prefill; 0 without)."""
    if not record.prefill:
        return 0
    ids = record.input_ids
    for k in range(min(len(target), len(ids) - record.t_inst - 1), 0, -1):
        if tuple(ids[-k:]) == tuple(target[:k]):
            return k
    return 0


def target_logprobs(
    lm: LoadedModel, attacks: AttackSet, *, batch_size: int | None = None
) -> Float[np.ndarray, " n"]:
    """Mean log-probability per token of each record's target after its adversarial prompt.

    The prompt is the record's saved ids without its prefill (the prefill is the target's start,
    scored with the rest), so on the source model this is ``-record.final_loss`` up to float32
    rounding.

    Returns:
        float64 array ``[len(attacks)]``, nats per target token (≤ 0).
    """
    tok = lm.tokenizer
    prompts, targets = [], []
    for record in attacks.records:
        target = encode_plain(tok, record.target)
        cut = len(record.input_ids) - _prefilled(record, target)
        prompts.append(record.input_ids[:cut])
        targets.append(target)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    losses, _ = sequence_losses(lm.model, pad, prompts, targets, batch_size=batch_size or 16)
    return -losses.double().numpy()


def transfer_rows(
    lm: LoadedModel, config: Any, *, progress: bool = False
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The transfer rows of one checkpoint for every set in ``config.attacks`` (module docstring).

    Args:
        config: the :class:`~safegeom.audit.config.AuditConfig` (``attacks``, ``generate``,
            ``judge``, ``max_new_tokens``, ``batch_size``, ``n_resamples``, ``seed``).

    Returns:
        ``(rows, seconds)``: schema rows (layer and carrier null) and the wall seconds of
        ``generation`` (judged sets) and ``scoring`` (refusal scores, target log-probabilities).

    Raises:
        SafegeomError: a missing or corrupt set; ConfigError: one made with another tokenizer.
    """
    sets = load_attack_sets(config.attacks)
    check_replayable(lm, sets)
    boot = {"n_resamples": config.n_resamples, "seed": config.seed}
    rows: list[dict[str, Any]] = []
    gen_s = score_s = 0.0
    for name, attacks in sets.items():
        at = {"source": SOURCE_PREFIX + name, "prompts": f"attack:{attacks.name}"}
        common = {"batch_size": config.batch_size, "system": attacks.system, "progress": progress}
        started = time.perf_counter()
        if config.generate:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*completions are empty")
                settings = EvaluateConfig(
                    judge=config.judge,
                    max_new_tokens=config.max_new_tokens,
                    batch_size=config.batch_size,
                    system=attacks.system,
                    **boot,
                )
                result = evaluate(lm, attacks, settings, progress=progress)
            rows.append(metric_row("attack_asr", result.metrics["asr"], result.judge, **at))
            score = result.metrics["mean_refusal_score"]
            gen_s += time.perf_counter() - started
        else:
            values = refusal_scores(lm, attacks, **common).numpy()
            score = Metric.from_values("attack_refusal_score", values, **boot)
            score_s += time.perf_counter() - started
        rows.append(metric_row("attack_refusal_score", score, **at))
        started = time.perf_counter()
        logp = target_logprobs(lm, attacks, batch_size=config.batch_size)
        detail = {"unit": "nats per target token"}
        metric = Metric.from_values("attack_target_logprob", logp, detail=detail, **boot)
        rows.append(metric_row("attack_target_logprob", metric, **at))
        score_s += time.perf_counter() - started
    return rows, {"generation": gen_s, "scoring": score_s}
