"""AutoDAN-style genetic search over jailbreak templates (Liu et al. 2024; **our proposal** where
the paper's resources are missing, docs/methods.md §11).

A population of templates (:mod:`safegeom.attacks.templates`, written here) holds the behaviour
at ``[REQUEST]``. Each generation:

1. fitness = the target's log-likelihood after the chat-formatted prompt (minus the mean
   cross-entropy, nats per token), all individuals in batched forwards;
2. the ``elite`` fittest pass unchanged;
3. the rest are children of two parents drawn with probability ∝ ``exp(fitness)``: sentence-level
   uniform crossover with probability ``crossover``, then, with probability ``mutation``, one
   word- or sentence-level edit (synonym swap, sentence swap, drop, or insertion from another
   template).

The paper's LLM paraphraser and momentum word scores are not used (no offline paraphraser; our
simplification). Seeded by ``seed + index`` with Python's ``random.Random``: the same seed gives
the same search. Stops early once the target is the greedy continuation of the best prompt.

Example (not a doctest: it needs a loaded model ``lm``)::

    attacks = attack(lm, ["Explain how to pick a lock"], ["Sure, here is how"],
                     AutoDANConfig(generations=5, population=8))
    attacks.records[0].steps <= 5
    # -> True
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from safegeom.attacks.attack_set import AttackRecord, AttackSet
from safegeom.attacks.loss import sequence_losses
from safegeom.attacks.runner import AttackOptions, StepCallback, run_attack
from safegeom.attacks.templates import TEMPLATES, crossover, fill, mutate
from safegeom.errors import ConfigError, SafegeomError
from safegeom.models.chat import EncodedPrompt, encode_prompts
from safegeom.models.loading import LoadedModel
from safegeom.models.plain_text import encode_plain

__all__ = ["AutoDANConfig", "attack", "attack_one"]


@dataclass(frozen=True)
class AutoDANConfig:
    """How the genetic search runs (defaults: ours, small enough for a CPU)."""

    population: int = 16
    """Templates per generation."""
    generations: int = 20
    """Generations per behaviour."""
    elite: int = 2
    """Fittest templates passed on unchanged."""
    crossover: float = 0.5
    """Probability that a child is a crossover of two parents (else a copy of the first)."""
    mutation: float = 0.3
    """Probability that a child gets one word- or sentence-level edit."""
    early_stop: bool = field(default=True, metadata={"cli": False})
    """Stop once the target is the greedy continuation of the best prompt (command line: GCG's
    --early-stop, shared)."""
    batch_size: int = field(default=16, metadata={"cli": False})
    """Prompts per forward pass (command line: GCG's --batch-size, shared)."""
    seed: int = field(default=0, metadata={"cli": False})
    """Seed of the search, behaviour i uses seed + i (command line: GCG's --seed, shared)."""

    def __post_init__(self) -> None:
        """Check ranges, naming the flags.

        Raises:
            ConfigError: a value out of range.
        """
        for name in ("population", "generations", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if not 0 <= self.elite < self.population:
            raise ConfigError(f"--elite must be in [0, --population), got {self.elite}")
        for name in ("crossover", "mutation"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name} is a probability in [0, 1], got {getattr(self, name)}")


def _initial(config: AutoDANConfig, rng: random.Random) -> list[str]:
    """The templates, then mutated copies of them up to the population size."""
    population = list(TEMPLATES[: config.population])
    while len(population) < config.population:
        population.append(mutate(TEMPLATES[len(population) % len(TEMPLATES)], rng))
    return population


def _next(
    population: list[str], losses: list[float], config: AutoDANConfig, rng: random.Random
) -> list[str]:
    """The next generation: elites, then children of fitness-weighted parents."""
    order = sorted(range(len(population)), key=lambda i: (losses[i], i))
    best = min(losses)
    weights = [math.exp(best - loss) for loss in losses]  # exp(fitness), fitness = -loss
    children = [population[i] for i in order[: config.elite]]
    while len(children) < config.population:
        a, b = rng.choices(range(len(population)), weights=weights, k=2)
        child = (
            crossover(population[a], population[b], rng)
            if rng.random() < config.crossover
            else population[a]
        )
        if rng.random() < config.mutation:
            child = mutate(child, rng)
        children.append(child)
    return children


def attack_one(
    lm: LoadedModel,
    behaviour: str,
    target: str,
    config: AutoDANConfig,
    *,
    index: int = 0,
    system: str | None = None,
    on_step: StepCallback | None = None,
) -> AttackRecord:
    """The genetic search on one behaviour (seeded by ``config.seed + index``).

    Returns:
        Its record: the best prompt found, the best loss after each generation (nats per token).

    Raises:
        SafegeomError: an empty behaviour, a target that tokenises to nothing, no chat template.
    """
    start = time.perf_counter()
    tok = lm.tokenizer
    if not behaviour.strip():
        raise SafegeomError("empty behaviour: every behaviour needs text")
    target_ids = encode_plain(tok, target)
    if not target_ids:
        raise SafegeomError(
            f"the target for {behaviour[:40]!r} tokenises to nothing; give a non-empty target "
            "(--target-column or targets=[...])"
        )
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rng = random.Random(config.seed + index)
    population = _initial(config, rng)

    def score(templates: list[str]) -> tuple[list[EncodedPrompt], list[float], list[bool]]:
        prompts = [fill(t, behaviour) for t in templates]
        encoded = encode_prompts(tok, prompts, system=system, chat_template=lm.chat_template)
        losses, hits = sequence_losses(
            lm.model,
            pad,
            [e.input_ids for e in encoded],
            [target_ids] * len(encoded),
            batch_size=config.batch_size,
        )
        return encoded, losses.tolist(), hits.tolist()

    (plain,), (initial,), _ = score(["[REQUEST]"])
    best: tuple[float, str, EncodedPrompt] = (initial, behaviour, plain)
    trace: list[float] = []
    steps = 0
    for generation in range(config.generations):
        encoded, losses, hits = score(population)
        j = min(range(len(losses)), key=lambda i: (losses[i], i))
        if losses[j] < best[0] or generation == 0:
            best = (losses[j], fill(population[j], behaviour), encoded[j])
        trace.append(best[0])
        steps = generation + 1
        if on_step is not None:
            on_step(steps, losses[j], best[0])
        if config.early_stop and hits[j]:
            break
        population = _next(population, losses, config, rng)
    _, prompt, enc = best
    return AttackRecord(
        behaviour=behaviour,
        target=target,
        prompt=prompt,
        input_ids=enc.input_ids,
        inst_start=enc.inst_start,
        t_inst=enc.t_inst,
        losses=tuple(trace),
        initial_loss=initial,
        steps=steps,
        seconds=time.perf_counter() - start,
    )


def attack(
    lm: LoadedModel,
    behaviours: Sequence[str],
    targets: Sequence[str],
    config: AutoDANConfig = AutoDANConfig(),
    *,
    options: AttackOptions | None = None,
) -> AttackSet:
    """The genetic search on each behaviour, judged on the source model.

    Returns:
        An :class:`~safegeom.attacks.attack_set.AttackSet` (``method="autodan"``).
    """
    return run_attack(lm, "autodan", behaviours, targets, config, attack_one, options=options)
