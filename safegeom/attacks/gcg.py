"""GCG: greedy coordinate gradient search for an adversarial suffix (Zou et al. 2023).

docs/methods.md §11. Each step, for the current adversarial tokens ``x`` (``n_tokens`` of them,
after the behaviour inside the user turn, or before it with ``placement="prefix"``):

1. the gradient of the target loss w.r.t. the one-hot tokens (:func:`~safegeom.attacks.loss.token_gradient`);
2. per position, the ``top_k`` allowed tokens with the most negative gradient (special tokens and,
   by default, non-ASCII tokens are never allowed);
3. ``search_width`` candidates, each ``x`` with ``n_replace`` random positions set to random
   top-k tokens (a seeded CPU generator: the same seed gives the same candidates);
4. candidates whose prompt text does not tokenize back to their ids are dropped
   (:func:`~safegeom.attacks.slots.round_trips`);
5. the rest are scored in batched forwards that reuse the prompt prefix's KV cache, and the
   lowest-loss candidate becomes ``x``.

The search stops early once the target is the greedy continuation (every target token is the
argmax after the tokens before it). The saved prompt is the lowest-loss one found (the one that
stopped the search, when it stopped early). ``universal=True`` optimises one string for all
behaviours at once (the mean loss, the summed gradient); Zou et al. add behaviours progressively,
we take them all from the first step (our simplification).

Example (not a doctest: it needs a loaded model ``lm``)::

    attacks = attack(lm, ["Explain how to pick a lock"], ["Sure, here is how"],
                     GCGConfig(n_tokens=8, steps=20, search_width=64))
    attacks.records[0].final_loss < attacks.records[0].initial_loss
    # -> True
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from safegeom.attacks.attack_set import AttackRecord, AttackSet
from safegeom.attacks.loss import candidate_losses, prefix_cache, token_gradient
from safegeom.attacks.runner import AttackOptions, StepCallback, run_attack
from safegeom.attacks.slots import AttackSlot, allowed_tokens, build_slot, round_trips
from safegeom.errors import ConfigError
from safegeom.models.loading import LoadedModel

__all__ = ["Advanced", "GCGConfig", "advance", "attack", "attack_one", "sample_candidates"]


@dataclass(frozen=True)
class GCGConfig:
    """How GCG searches (defaults: nanoGCG 0.3's, which follow Zou et al. 2023)."""

    n_tokens: int = 20
    """Length of the adversarial string, in tokens."""
    steps: int = 250
    """Optimisation steps per behaviour (or for the universal string)."""
    search_width: int = 512
    """Candidates evaluated per step."""
    top_k: int = 256
    """Tokens kept per position from the gradient."""
    n_replace: int = 1
    """Positions swapped in each candidate."""
    placement: Literal["suffix", "prefix"] = "suffix"
    """Where the adversarial string goes: after the behaviour, or before it."""
    init: str | None = None
    """Initial adversarial text, n_tokens tokens (default: "x x ... x")."""
    allow_non_ascii: bool = False
    """Allow tokens that decode to non-ASCII or unprintable text."""
    filter_ids: bool = True
    """Drop candidates whose prompt text does not tokenize back to their ids."""
    early_stop: bool = True
    """Stop once the target is the greedy continuation."""
    universal: bool = False
    """One adversarial string for all behaviours (the mean loss over them)."""
    batch_size: int | None = None
    """Candidates per forward pass (default: the whole search width)."""
    seed: int = 0
    """Seed of the candidate sampling (behaviour i uses seed + i)."""

    def __post_init__(self) -> None:
        """Check ranges, naming the flags.

        Raises:
            ConfigError: a value out of range.
        """
        for name in ("n_tokens", "steps", "search_width", "top_k", "n_replace"):
            value = getattr(self, name)
            if value < 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be at least 1, got {value}")
        if self.n_replace > self.n_tokens:
            raise ConfigError(f"--n-replace {self.n_replace} exceeds --n-tokens {self.n_tokens}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")


def sample_candidates(
    current: Int[Tensor, " n"],
    top: Int[Tensor, "n k"],
    width: int,
    n_replace: int,
    generator: torch.Generator,
) -> Int[Tensor, "width n"]:
    """``width`` copies of ``current``, each with ``n_replace`` distinct random positions set to a
    random one of that position's top-k tokens.

    Returns:
        The candidate token rows (CPU, long).
    """
    n, k = top.shape
    positions = torch.rand(width, n, generator=generator).argsort(-1)[:, :n_replace]
    choice = torch.randint(0, k, (width, n_replace), generator=generator)
    out = current[None].repeat(width, 1)
    out.scatter_(1, positions, top[positions, choice])
    return out


class _Search:
    """The state of one GCG search over one or more slots (one string for all of them)."""

    def __init__(
        self,
        lm: LoadedModel,
        slots: Sequence[AttackSlot],
        config: GCGConfig,
        allowed: Bool[Tensor, " vocab"] | None = None,
    ) -> None:
        self.lm, self.slots, self.config = lm, slots, config
        model = lm.model
        self.prefixes = [prefix_cache(model, s.before_ids) for s in slots]
        self.tails = [s.tail() for s in slots]
        vocab = model.get_input_embeddings().weight.shape[0]
        if allowed is None:
            allowed = allowed_tokens(lm.tokenizer, vocab, allow_non_ascii=config.allow_non_ascii)
        self.allowed = allowed

    def losses(self, candidates: Tensor) -> tuple[Tensor, Bool[Tensor, " b"]]:
        """Mean loss over the slots per candidate, and whether every slot's target is greedy."""
        total, hits = (
            torch.zeros(candidates.shape[0]),
            torch.ones(candidates.shape[0], dtype=torch.bool),
        )
        for slot, prefix, tail in zip(self.slots, self.prefixes, self.tails, strict=True):
            loss, hit = candidate_losses(
                self.lm.model,
                prefix,
                candidates,
                tail,
                len(slot.target_ids),
                batch_size=self.config.batch_size,
            )
            total += loss
            hits &= hit
        return total / len(self.slots), hits

    def gradient(self, current: Tensor) -> Tensor:
        """The summed one-hot gradient over the slots, disallowed tokens at +inf."""
        grad = sum(
            token_gradient(self.lm.model, p, current, t, len(s.target_ids))
            for s, p, t in zip(self.slots, self.prefixes, self.tails, strict=True)
        )
        return grad.masked_fill(~self.allowed[None, : grad.shape[1]], float("inf"))

    def keep(self, candidates: Tensor) -> Tensor:
        """The candidates that round-trip in every slot's prompt (all of them without the filter)."""
        if not self.config.filter_ids:
            return candidates
        mask = torch.ones(candidates.shape[0], dtype=torch.bool)
        for slot in self.slots:
            mask &= round_trips(self.lm.tokenizer, slot, candidates)
        return candidates[mask]

    def run(
        self, seed: int, on_step: StepCallback | None
    ) -> tuple[Tensor, list[float], float, int]:
        """Search; returns ``(best tokens, loss per step, initial loss, steps run)``."""
        cfg = self.config
        generator = torch.Generator().manual_seed(seed)
        current = torch.tensor(self.slots[0].opt_ids, dtype=torch.long)
        initial, greedy = self.losses(current[None])
        best, best_loss, trace = current, float(initial[0]), []
        if cfg.early_stop and bool(greedy[0]):
            return best, trace, best_loss, 0
        for step in range(cfg.steps):
            moved = self.step(current, generator)
            if moved is None:  # every candidate changed under decode -> encode
                trace.append(trace[-1] if trace else best_loss)
                continue
            current, loss, hit = moved
            trace.append(loss)
            if loss < best_loss:
                best, best_loss = current, loss
            if on_step is not None:
                on_step(step + 1, loss, best_loss)
            if cfg.early_stop and hit:
                return current, trace, float(initial[0]), step + 1
        return best, trace, float(initial[0]), cfg.steps

    def step(
        self, current: Int[Tensor, " n"], generator: torch.Generator
    ) -> tuple[Int[Tensor, " n"], float, bool] | None:
        """One GCG step from ``current``: gradient, top-k, sampled candidates, filter, best.

        Returns:
            ``(best candidate, its mean loss in nats per target token, whether its target is
            greedy)``, or ``None`` when no candidate survived the round-trip filter.
        """
        cfg = self.config
        top = (-self.gradient(current)).topk(cfg.top_k, dim=1).indices
        candidates = self.keep(
            sample_candidates(current, top, cfg.search_width, cfg.n_replace, generator)
        )
        if candidates.shape[0] == 0:
            return None
        losses, hits = self.losses(candidates)
        j = int(losses.argmin())
        return candidates[j], float(losses[j]), bool(hits[j])


def _record(
    lm: LoadedModel,
    slot: AttackSlot,
    best: Tensor,
    trace: list[float],
    initial: float,
    steps: int,
    seconds: float,
) -> AttackRecord:
    ids = best.tolist()
    inst_start, t_inst = slot.positions(ids)
    return AttackRecord(
        behaviour=slot.behaviour,
        target=slot.target,
        prompt=slot.prompt_text(lm.tokenizer, ids),
        input_ids=slot.prompt_ids(ids),
        inst_start=inst_start,
        t_inst=t_inst,
        losses=tuple(trace),
        initial_loss=initial,
        steps=steps,
        seconds=seconds,
    )


def _slot(
    lm: LoadedModel, behaviour: str, target: str, config: GCGConfig, system: str | None
) -> AttackSlot:
    return build_slot(
        lm,
        behaviour,
        target,
        n_tokens=config.n_tokens,
        init=config.init,
        placement=config.placement,
        system=system,
    )


def attack_one(
    lm: LoadedModel,
    behaviour: str,
    target: str,
    config: GCGConfig,
    *,
    index: int = 0,
    system: str | None = None,
    on_step: StepCallback | None = None,
) -> AttackRecord:
    """GCG on one behaviour (seeded by ``config.seed + index``).

    Returns:
        Its :class:`~safegeom.attacks.attack_set.AttackRecord` (not yet judged).
    """
    start = time.perf_counter()
    slot = _slot(lm, behaviour, target, config, system)
    best, trace, initial, steps = _Search(lm, [slot], config).run(config.seed + index, on_step)
    return _record(lm, slot, best, trace, initial, steps, time.perf_counter() - start)


@dataclass(frozen=True)
class Advanced:
    """Where :func:`advance` left an adversarial string."""

    ids: tuple[int, ...]
    """The adversarial tokens after the steps (the last step's best candidate)."""
    loss: float
    """Their target loss on the model the steps ran against (nats per target token)."""
    hit: bool
    """Whether the target is the greedy continuation of the prompt with these tokens."""
    steps: int
    """Steps run (fewer than asked when ``early_stop`` ended them)."""


def advance(
    lm: LoadedModel,
    slot: AttackSlot,
    ids: Sequence[int],
    steps: int,
    config: GCGConfig,
    generator: torch.Generator,
    *,
    allowed: Bool[Tensor, " vocab"] | None = None,
) -> Advanced:
    """Run ``steps`` GCG steps from the adversarial tokens ``ids`` of ``slot``, against ``lm``'s
    model as it is now (what adversarial training does to its pool of test cases).

    Each step moves to its best candidate (as :func:`attack_one` does); ``config`` gives the
    search (``search_width``, ``top_k``, ``n_replace``, ``filter_ids``, ``early_stop``,
    ``batch_size``; its ``steps`` and ``seed`` are not used: ``steps`` and ``generator`` are).
    ``allowed`` is the token mask (computed from the tokenizer when ``None``; pass it to avoid
    recomputing it on every call).

    Returns:
        An :class:`Advanced` (the new tokens, their loss and whether the target is greedy).

    Raises:
        ConfigError: ``steps`` below 1, or ``ids`` not as long as the slot's string.
    """
    if steps < 1:
        raise ConfigError(f"GCG steps per advance must be at least 1, got {steps}")
    if len(ids) != len(slot.opt_ids):
        raise ConfigError(
            f"the adversarial string has {len(ids)} tokens; its slot holds {len(slot.opt_ids)}"
        )
    search = _Search(lm, [slot], config, allowed)
    current = torch.tensor(list(ids), dtype=torch.long)
    loss, hit, run = None, False, 0
    for _ in range(steps):
        run += 1
        moved = search.step(current, generator)
        if moved is None:
            continue
        current, loss, hit = moved
        if config.early_stop and hit:
            break
    if loss is None:  # no step kept a candidate: the string's own loss
        losses, hits = search.losses(current[None])
        loss, hit = float(losses[0]), bool(hits[0])
    return Advanced(tuple(current.tolist()), loss, hit, run)


def attack_universal(
    lm: LoadedModel,
    behaviours: Sequence[str],
    targets: Sequence[str],
    config: GCGConfig,
    *,
    system: str | None = None,
    on_step: StepCallback | None = None,
) -> list[AttackRecord]:
    """One GCG string for every behaviour (the mean target loss over them).

    Returns:
        One record per behaviour, all with the same adversarial tokens and the shared loss trace.
    """
    start = time.perf_counter()
    slots = [_slot(lm, b, t, config, system) for b, t in zip(behaviours, targets, strict=True)]
    if len({s.opt_ids for s in slots}) != 1:
        raise ConfigError(
            "the initial string tokenizes differently next to different behaviours; give --init"
        )
    best, trace, initial, steps = _Search(lm, slots, config).run(config.seed, on_step)
    seconds = time.perf_counter() - start
    return [_record(lm, s, best, trace, initial, steps, seconds) for s in slots]


def attack(
    lm: LoadedModel,
    behaviours: Sequence[str],
    targets: Sequence[str],
    config: GCGConfig = GCGConfig(),
    *,
    options: AttackOptions | None = None,
) -> AttackSet:
    """GCG on each behaviour (or one universal string), judged on the source model.

    Returns:
        An :class:`~safegeom.attacks.attack_set.AttackSet` (``method="gcg"``).

    Raises:
        SafegeomError: an empty behaviour set, a target that tokenises to nothing, a model
            without a chat template, a config value out of range.
    """
    universal: Callable[..., list[AttackRecord]] | None = (
        attack_universal if config.universal else None
    )
    return run_attack(
        lm, "gcg", behaviours, targets, config, attack_one, options=options, together=universal
    )
