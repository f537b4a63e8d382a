"""Running an attack over a behaviour set: judging on the source, saving, resuming.

:func:`run_attack` attacks behaviour after behaviour with a method's ``attack_one`` (each seeded
by its index, so behaviour ``i`` gets the same result whether the run started at 0 or resumed at
``i``), generates the source model's greedy answer to each adversarial prompt and judges it, and,
with ``out``, saves the set after every behaviour. ``resume=True`` reloads that file and continues
after its last behaviour: on CPU the finished set equals an uninterrupted run's (timings aside).

The behaviours are the units of :func:`attack_units`, a leaf of :mod:`safegeom.execution`: under a
launcher the entry points install its sharded twin
(:func:`safegeom.parallel.attacks.attack_units_dealt`), which deals the behaviours over the
ranks, one per rank per round, and saves after each round: the same set, bit for bit on CPU.

Example (not a doctest: it needs a loaded model ``lm``)::

    attacks = run_attack(lm, "gcg", behaviours, targets, GCGConfig(steps=50), gcg.attack_one,
                         out="runs/gcg", resume=True)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from safegeom.artifacts import Provenance
from safegeom.attacks.attack_set import (
    FILE_NAME,
    AttackRecord,
    AttackSet,
    load_attack_set,
    tokenizer_hash,
)
from safegeom.errors import ConfigError, OutputPathError, SafegeomError
from safegeom.execution import shows_progress, twin
from safegeom.generation import generate_from_ids, stop_token_ids
from safegeom.judges import get_judge
from safegeom.models.chat import template_hash
from safegeom.models.loading import LoadedModel

__all__ = ["AttackOptions", "StepCallback", "attack_units", "judge_records", "run_attack"]

StepCallback = Callable[[int, float, float], None]
"""Called after each optimisation step with ``(step, loss, best loss so far)`` (nats per token)."""


@dataclass(frozen=True)
class AttackOptions:
    """What every attack shares: the chat setting and how success on the source is judged."""

    system: str | None = None
    """System prompt of the attacked chat."""
    judge: str = "substring"
    """Judge of success on the source model (substring, xstest, hf-classifier:PATH, chat-judge:PATH)."""
    max_new_tokens: int = 48
    """Tokens of the source model's answer that the judge reads."""
    judge_source: bool = True
    """Generate and judge the source model's answer to each adversarial prompt."""

    def __post_init__(self) -> None:
        """Check ranges, naming the flags.

        Raises:
            ConfigError: a value out of range.
        """
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")


class AttackOne(Protocol):
    """A method's attack on one behaviour."""

    def __call__(
        self,
        lm: LoadedModel,
        behaviour: str,
        target: str,
        config: Any,
        *,
        index: int,
        system: str | None,
        on_step: StepCallback | None,
    ) -> AttackRecord: ...


def judge_records(
    lm: LoadedModel, records: Sequence[AttackRecord], options: AttackOptions
) -> list[AttackRecord]:
    """The records with the source model's greedy answer and the judge's verdict filled in.

    Returns:
        New records (``success = not refused``, ``completion`` the answer after any prefill).
    """
    stops = stop_token_ids(lm.tokenizer, lm.base, lm.chat_template)
    answers = generate_from_ids(
        lm.model,
        lm.tokenizer,
        [r.input_ids for r in records],
        max_new_tokens=options.max_new_tokens,
        stop_ids=stops,
        progress=False,
    )
    refused = get_judge(options.judge)([r.behaviour for r in records], answers)
    return [
        replace(r, success=not no, completion=a)
        for r, a, no in zip(records, answers, refused, strict=True)
    ]


def attack_units(
    n: int,
    run: Callable[[int], Sequence[AttackRecord]],
    save: Callable[[list[AttackRecord]], None],
) -> list[AttackRecord]:
    """Run an attack's ``n`` units in order, calling ``save(records so far)`` after each.

    A unit is one behaviour (or one universal attack of them all). This is the one-process
    leaf; under a launcher the entry points install its sharded twin (:mod:`safegeom.execution`):
    :func:`safegeom.parallel.attacks.attack_units_dealt` deals the units over the ranks and
    returns the same records.

    Returns:
        Every unit's records, in unit order.

    Example:
        >>> attack_units(2, lambda k: [f"record {k}"], lambda so_far: None)
        ['record 0', 'record 1']
    """
    if (shared := twin("attack_units")) is not None:
        return shared(n, run, save)
    records: list[AttackRecord] = []
    for k in range(n):
        records.extend(run(k))
        save(list(records))
    return records


def _check_inputs(behaviours: Sequence[str], targets: Sequence[str]) -> None:
    if len(behaviours) == 0:
        raise SafegeomError(
            "empty behaviour set: give at least one behaviour to attack (--prompts)"
        )
    if len(targets) != len(behaviours):
        raise SafegeomError(
            f"{len(targets)} targets for {len(behaviours)} behaviours; give one target per behaviour"
        )


def _new_set(
    lm: LoadedModel,
    method: str,
    config: Any,
    options: AttackOptions,
    records: Sequence[AttackRecord],
    name: str,
    prompt_sets: dict[str, str],
) -> AttackSet:
    return AttackSet(
        method=method,
        name=name,
        records=tuple(records),
        tokenizer_hash=tokenizer_hash(lm.tokenizer),
        template_hash=template_hash(lm.tokenizer, lm.chat_template),
        system=options.system,
        judge=options.judge if options.judge_source else "",
        provenance=Provenance(
            model=lm.name,
            weight_hash=lm.weight_hash,
            prompt_sets=prompt_sets,
            config=dataclasses.asdict(config),
            extra={"method": method, "options": dataclasses.asdict(options)},
        ),
    )


def _resumed(
    out: Path, fresh: AttackSet, behaviours: Sequence[str], targets: Sequence[str]
) -> list[AttackRecord]:
    """The records already in ``out`` when they belong to this very attack."""
    saved = load_attack_set(out)
    same = (
        saved.method == fresh.method
        and dict(saved.provenance.config) == dict(fresh.provenance.config)
        and saved.provenance.extra.get("options") == fresh.provenance.extra.get("options")
        and saved.provenance.weight_hash == fresh.provenance.weight_hash
        and saved.tokenizer_hash == fresh.tokenizer_hash
        and all(
            r.behaviour == b and r.target == t
            for r, b, t in zip(saved.records, behaviours, targets, strict=False)
        )
        and len(saved.records) <= len(behaviours)
    )
    if not same:
        raise SafegeomError(
            f"{out} holds an attack with another model, config or behaviours; drop --resume or "
            "choose another --out"
        )
    return list(saved.records)


def run_attack(
    lm: LoadedModel,
    method: str,
    behaviours: Sequence[str],
    targets: Sequence[str],
    config: Any,
    attack_one: AttackOne,
    *,
    options: AttackOptions | None = None,
    together: Callable[..., list[AttackRecord]] | None = None,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = False,
    name: str | None = None,
    prompt_sets: dict[str, str] | None = None,
) -> AttackSet:
    """Attack each behaviour (or all at once with ``together``) and judge it on the source.

    Args:
        attack_one: the method's per-behaviour attack.
        together: an attack of all behaviours at once (a universal string); no per-behaviour
            resume then.
        out: folder to save the set in after every behaviour (``out/attack_set.json``).
        resume: continue the set already in ``out``.

    Returns:
        The :class:`~safegeom.attacks.attack_set.AttackSet`, in behaviour order.

    Raises:
        SafegeomError: an empty behaviour set, mismatched targets, ``out`` holding another
            attack (or any attack, without ``resume``).
    """
    options = options or AttackOptions()
    _check_inputs(behaviours, targets)
    name = name or method
    prompt_sets = prompt_sets or {}
    fresh = _new_set(lm, method, config, options, [], name, prompt_sets)
    target = None if out is None else Path(out)
    records: list[AttackRecord] = []
    if target is not None and (target / FILE_NAME).is_file():
        if not resume:
            raise OutputPathError(
                f"{target} already holds an attack set; pass --resume to continue it or choose "
                "another --out"
            )
        records = _resumed(target, fresh, behaviours, targets)
    bar = tqdm(
        total=len(behaviours),
        initial=len(records),
        desc=method,
        unit="behaviour",
        disable=not (progress and shows_progress()),
    )

    def on_step(step: int, loss: float, best: float) -> None:
        bar.set_postfix(step=step, loss=f"{loss:.3f}", best=f"{best:.3f}", refresh=False)

    def finish(new: list[AttackRecord]) -> list[AttackRecord]:
        return judge_records(lm, new, options) if options.judge_source else new

    universal = together is not None and not records

    def unit(k: int) -> list[AttackRecord]:
        if universal:  # one unit: every behaviour at once
            assert together is not None
            return finish(
                together(lm, behaviours, targets, config, system=options.system, on_step=on_step)
            )
        i = len(records) + k
        one = attack_one(
            lm, behaviours[i], targets[i], config, index=i, system=options.system, on_step=on_step
        )
        return finish([one])

    def save(new: list[AttackRecord]) -> None:
        bar.update(len(records) + len(new) - bar.n)
        if target is not None:
            replace(fresh, records=(*records, *new)).save(target)

    new = attack_units(1 if universal else len(behaviours) - len(records), unit, save)
    bar.close()
    return replace(fresh, records=(*records, *new))
