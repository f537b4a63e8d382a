"""R2D2, HarmBench's Robust Refusal Dynamic Defense (Mazeika et al. 2024; docs/methods.md §12).

Adversarial training against a pool of GCG test cases that keeps being attacked while the model
trains. The run's ``--task`` is the utility data (SFT on harmless instructions with answers); the
behaviours (``harmbench-train`` by default) are attacked. Every step ``s``:

1. every ``reset_every`` (K) steps (``s > 0``, ``s mod K = 0``), a fraction ``reset_fraction``
   of the pool's suffixes is redrawn at random;
2. ``attacked_per_step`` (n) behaviours are sampled, and their test cases advanced by
   ``gcg_steps`` (m) GCG steps against the **current** model
   (:func:`safegeom.attacks.gcg.advance`, adapters on, dropout off);
3. one optimiser step on ``away_weight · away + toward_weight · toward + utility_weight ·
   utility``: *away* is the unlikelihood of the affirmative target under the adversarial prompt,
   ``−log(1 − p)`` per target token (tokens with ``log p`` below ``away_floor`` carry none, as in
   HarmBench's code), averaged over the sampled behaviours' target tokens; *toward* the
   cross-entropy of the refusal (``harmbench-train``'s safe responses) under the same prompts;
   *utility* the LM loss on the step's task batch, answered by the base model's own greedy
   answers (``utility_answers="base"``, the default: generated once, up to ``answer_tokens``
   tokens, saved as ``DIR/defence/r2d2_answers.json`` and read back on resume) or by the task's
   responses (``"task"``).

The manifest logs, per step, the terms ``away``, ``toward``, ``utility``, ``attack`` (the sampled
test cases' target loss after the step's GCG) and, over the whole pool on the model the step
attacked, ``pool_loss`` (mean target loss, nats per token) and ``pool_asr`` (the fraction whose
target is the greedy continuation, a prefix match). The pool is saved with every checkpoint
(:mod:`.r2d2_pool`), so ``--resume`` continues bit for bit.

Where the paper and HarmBench's code are silent or cannot be followed here, **ours**, each
configurable: one test case per behaviour (HarmBench: a pool of sampled behaviours whose reset
also redraws the behaviour); suffixes initialised to random allowed tokens (HarmBench: ``"! ! !"``
of random length); targets ``"Sure, here is how to {behaviour}"`` (HarmBench's adversarial-training
targets are not bundled); no system prompt in the adversarial prompts; HarmBench's validation
behaviours are not trained on (held out here). HarmBench's defaults: m = 5, search width 512,
n = 8, K = 50, 20% reset, weights 0.5 / 0.5 / 1 and the floor ``log p ≥ −5``.

Under a launcher every rank advances the same sampled test cases (the same seeded draws, so every
rank holds the same pool; the attack is not split between ranks) and computes the away and toward
terms on its contiguous part of them, normalised over all of them, so the ranks' shares add up to
the loss of one process.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from safegeom.artifacts import read_json, sha256_text, write_json
from safegeom.attacks.gcg import GCGConfig
from safegeom.attacks.loss import sequence_losses
from safegeom.config import check, config_dict
from safegeom.errors import ArtifactError, ConfigError
from safegeom.generation import generate
from safegeom.models.loading import LoadedModel
from safegeom.prompt_roles import check_trainable
from safegeom.prompts import load_prompts
from safegeom.training.config import RunConfig
from safegeom.training.data import IGNORE_INDEX, Example, collate_right, encode_examples
from safegeom.training.methods.base import Method, Prepared, Setup, StepInputs, Terms, task_loss
from safegeom.training.methods.r2d2_pool import AttackPool, build_pool
from safegeom.training.trainable import Trainable

__all__ = ["ANSWERS_FILE", "METHOD", "R2D2Config", "R2D2State", "away_token_loss", "base_answers"]

ANSWERS_FILE = "r2d2_answers.json"
"""The base's answers to the task's prompts, in the run's ``defence`` folder."""
HARMBENCH_REFUSAL = "Sorry, I can't do that."
"""The refusal HarmBench trains toward (every ``harmbench-train`` safe response is this)."""


@dataclass(frozen=True)
class R2D2Config:
    """Settings of ``safegeom train r2d2`` (HarmBench's R2D2; defaults from its code)."""

    behaviours: str = "harmbench-train"
    """Behaviours attacked and trained to refuse: bundled set[:split] or a file (never an
    evaluation-only set)."""
    n_behaviours: int | None = None
    """Keep the first N behaviours (default: all)."""
    target_template: str = "Sure, here is how to {behaviour}"
    """The affirmative target of each behaviour's attack ({behaviour}: the behaviour with its
    first letter lower-cased and its final full stop dropped)."""
    refusal: str | None = None
    """The refusal trained toward (default: the behaviour set's responses, else HarmBench's
    "Sorry, I can't do that.")."""
    update: Literal["lora", "full"] = "lora"
    """What R2D2 trains: LoRA adapters or every weight."""
    gcg_steps: int = 5
    """m: GCG steps that advance each sampled test case per training step."""
    suffix_tokens: int = 20
    """Length of every adversarial suffix, in tokens."""
    search_width: int = 512
    """GCG candidates per attack step."""
    top_k: int = 256
    """GCG tokens kept per position from the gradient."""
    attack_batch: int | None = None
    """GCG candidates per forward pass (default: the whole search width)."""
    attacked_per_step: int = 8
    """n: behaviours sampled, attacked and trained on per step (the global number)."""
    reset_every: int = 50
    """K: redraw part of the pool every K steps."""
    reset_fraction: float = 0.2
    """Fraction of the pool redrawn at each reset."""
    away_weight: float = 0.5
    """Weight of the away loss, −log(1 − p) of the target tokens."""
    toward_weight: float = 0.5
    """Weight of the toward loss, the refusal's cross-entropy."""
    utility_weight: float = 1.0
    """Weight of the utility loss, the LM loss on the task's batch."""
    away_floor: float | None = -5.0
    """Target tokens with log-probability below this carry no away loss (none: all do)."""
    utility_answers: Literal["base", "task"] = "base"
    """What the utility loss trains on: the base model's own greedy answers to the task's
    prompts (base) or the task's responses (task)."""
    answer_tokens: int = 64
    """Longest base answer generated for the utility loss, in tokens."""

    def __post_init__(self) -> None:
        """Check every range, naming the flag.

        Raises:
            ConfigError: a value out of range.
        """
        if self.n_behaviours is not None:
            check(self.n_behaviours >= 1, "n_behaviours", "must be at least 1", self.n_behaviours)
        for name in ("gcg_steps", "suffix_tokens", "search_width", "top_k", "attacked_per_step"):
            value = getattr(self, name)
            check(value >= 1, name, "must be at least 1", value)
        if self.attack_batch is not None:
            check(self.attack_batch >= 1, "attack_batch", "must be at least 1", self.attack_batch)
        check(self.reset_every >= 1, "reset_every", "must be at least 1", self.reset_every)
        check(
            0.0 <= self.reset_fraction <= 1.0,
            "reset_fraction",
            "must lie in [0, 1]",
            self.reset_fraction,
        )
        for name in ("away_weight", "toward_weight", "utility_weight"):
            value = getattr(self, name)
            check(math.isfinite(value) and value >= 0, name, "must be 0 or more", value)
        if self.away_floor is not None:
            check(math.isfinite(self.away_floor), "away_floor", "must be finite", self.away_floor)
        check(self.update in ("lora", "full"), "update", "must be lora or full", self.update)
        check(
            self.utility_answers in ("base", "task"),
            "utility_answers",
            "must be base or task",
            self.utility_answers,
        )
        check(self.answer_tokens >= 1, "answer_tokens", "must be at least 1", self.answer_tokens)

    def gcg(self) -> GCGConfig:
        """The GCG search that advances the test cases (always ``gcg_steps`` steps: no early
        stop)."""
        return GCGConfig(
            n_tokens=self.suffix_tokens,
            steps=self.gcg_steps,
            search_width=self.search_width,
            top_k=min(self.top_k, self.search_width * self.suffix_tokens),
            batch_size=self.attack_batch,
            early_stop=False,
        )


def _target(template: str, behaviour: str) -> str:
    """``template`` with ``{behaviour}`` filled in (first letter lower-cased, final '.' dropped)."""
    text = behaviour.strip().rstrip(".")
    return template.replace("{behaviour}", text[:1].lower() + text[1:])


def away_token_loss(
    logits: Float[Tensor, "b seq vocab"], labels: Int[Tensor, "b seq"], floor: float | None
) -> Float[Tensor, "b seq"]:
    """``−log(1 − p)`` of every labelled token (0 elsewhere and where ``log p < floor``).

    ``log(1 − p)`` is ``log1p(−p)`` where ``p < 1/2`` and the log-sum-exp of the other tokens'
    logits minus that of all where ``p ≥ 1/2`` (each accurate in its range, as ``p → 0`` and
    ``p → 1``). ``labels`` are aligned with ``logits`` (already shifted).

    Returns:
        float32 ``[b, seq]``, in nats.

    Example:
        >>> logits = torch.tensor([[[0.0, 0.0]]])
        >>> round(float(away_token_loss(logits, torch.tensor([[0]]), None)), 4)  # p = 1/2
        0.6931
    """
    logits = logits.float()
    known = labels != IGNORE_INDEX
    index = labels.clamp(min=0)[..., None]
    every = torch.logsumexp(logits, -1)
    others = torch.logsumexp(logits.scatter(-1, index, float("-inf")), -1)
    log_p = logits.gather(-1, index)[..., 0] - every
    keep = known if floor is None else known & (log_p >= floor)
    # log(1 − p): log1p(−p) where p is small, the other tokens' mass where p is near 1
    small = log_p < -math.log(2.0)
    log_rest = torch.where(small, torch.log1p(-log_p.clamp(max=0).exp()), others - every)
    return torch.where(keep, -log_rest, torch.zeros_like(every))


@contextmanager
def _attacking(module: nn.Module) -> Iterator[None]:
    """Within the block the trained module runs as at inference (no dropout); then as before."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


def _part(items: Sequence[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous part of ``items`` (sizes differing by at most one)."""
    n = len(items)
    return list(items[rank * n // world : (rank + 1) * n // world])


class R2D2State(Prepared):
    """An R2D2 run's pool and settings; its loss attacks the pool, then adds the three terms."""

    def __init__(
        self,
        pool: AttackPool,
        settings: R2D2Config,
        record: dict[str, Any],
        answered: tuple[tuple[str, ...], tuple[str, ...]] | None = None,
    ) -> None:
        super().__init__(settings.update, record)
        self.pool = pool
        """The test cases (saved with every checkpoint)."""
        self.answered = answered
        """``(task prompts, the base's answers)`` of the utility loss (``None``: the task's)."""
        self.utility_rows: list[Example] | None = None
        """The encoded base-answer examples, one per task example (made by :meth:`wrap`)."""
        self.utility_tokens: list[int] = []
        """Answer tokens of each of :attr:`utility_rows` (after the causal shift)."""
        self.settings = settings
        """The run's R2D2 settings."""
        self.search = settings.gcg()
        """The GCG search of the attack steps."""
        self._stats: tuple[int, float, float] | None = None
        """``(step, pool loss, pool ASR)`` of the last step measured."""

    def wrap(
        self,
        lm: LoadedModel,
        spec: str | Path,
        run: RunConfig,
        *,
        dtype: str,
        resume_from: Path | None,
    ) -> Trainable:
        """Make ``lm`` trainable, the pool saved with every checkpoint and read back from
        ``resume_from`` when resuming.

        Raises:
            ConfigError: ``--fsdp`` (the attack runs whole forwards and gradients of the model
                inside every step, which sharded weights do not support here).
        """
        if run.train.fsdp:
            raise ConfigError(
                "--fsdp: r2d2 attacks the model inside every step, which is not supported on "
                "FSDP's sharded weights; drop --fsdp (every process then holds the whole model)"
            )
        trainable = super().wrap(lm, spec, run, dtype=dtype, resume_from=resume_from)
        if resume_from is not None:
            self.pool.load(resume_from)
        if self.answered is not None:
            prompts, answers = self.answered
            self.utility_rows = encode_examples(
                lm.tokenizer,
                list(prompts),
                list(answers),
                system=run.train.system,
                chat_template=lm.chat_template,
                max_length=run.max_length,
            )
            self.utility_tokens = [
                sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in self.utility_rows
            ]
        return dataclasses.replace(trainable, sidecar=self.pool.save)

    def attack(self, lm: LoadedModel, step: int) -> tuple[list[int], float, float]:
        """Reset (every K steps) and advance the pool for ``step`` once, then measure it.

        A second call for the same step (the loop's loss before the first update) changes
        nothing. Returns ``(sampled behaviours, pool loss, pool ASR)``.
        """
        cfg, pool = self.settings, self.pool
        sampled = pool.sample(step, cfg.attacked_per_step)
        if pool.step != step:
            if step > 0 and step % cfg.reset_every == 0:
                pool.reset(step, cfg.reset_fraction)
            pool.advance(lm, sampled, step, cfg.gcg_steps, self.search)
            pool.step = step
        if self._stats is None or self._stats[0] != step:
            prompts = [pool.prompt_ids(i) for i in range(len(pool))]
            targets = [s.target_ids for s in pool.slots]
            pad = lm.tokenizer.pad_token_id
            loss, hit = sequence_losses(lm.model, int(pad or 0), prompts, targets)
            self._stats = (step, float(loss.mean()), float(hit.float().mean()))
        return sampled, self._stats[1], self._stats[2]

    def adversarial(self, inputs: StepInputs, sampled: Sequence[int]) -> tuple[Tensor, Tensor]:
        """This rank's shares of the away and toward losses on its part of ``sampled``."""
        pool, floor = self.pool, self.settings.away_floor
        mine = _part(sampled, inputs.rank, inputs.world)
        n_away = sum(len(pool.slots[i].target_ids) for i in sampled)
        n_toward = sum(len(pool.refusals[i]) for i in sampled)
        zero = inputs.logits.new_zeros(()).float()
        if not mine:
            return zero, zero
        prompts = [pool.prompt_ids(i) for i in mine]
        rows = [
            Example((*p, *pool.slots[i].target_ids), len(p))
            for p, i in zip(prompts, mine, strict=True)
        ]
        rows += [
            Example((*p, *pool.refusals[i]), len(p)) for p, i in zip(prompts, mine, strict=True)
        ]
        batch = collate_right(rows, inputs.pad_id).to(inputs.batch.input_ids.device)
        logits = inputs.trainable.logits(
            batch.input_ids, batch.attention_mask, [r.n_prompt for r in rows]
        )[:, :-1]
        labels = batch.labels[:, 1:]
        k = len(mine)
        away = away_token_loss(logits[:k], labels[:k], floor).sum() / max(n_away, 1)
        toward = F.cross_entropy(
            logits[k:].float().reshape(-1, logits.shape[-1]),
            labels[k:].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        ) / max(n_toward, 1)
        return away, toward

    def utility(self, inputs: StepInputs) -> Tensor:
        """This rank's share of the LM loss on the step's examples answered by the base (the
        task's answers without base answers), per answer token of the whole batch."""
        if self.utility_rows is None:
            return task_loss(inputs)[0]
        rows = [self.utility_rows[i] for i in inputs.mine]
        batch = collate_right(rows, inputs.pad_id).to(inputs.batch.input_ids.device)
        logits = inputs.trainable.logits(
            batch.input_ids, batch.attention_mask, [r.n_prompt for r in rows]
        )
        nll = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            batch.labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return nll / max(sum(self.utility_tokens[i] for i in inputs.indices), 1)

    def loss(self, inputs: StepInputs) -> tuple[Tensor, Terms]:
        """Attack the pool, then ``away_weight · away + toward_weight · toward + utility_weight ·
        utility`` (terms ``away``, ``toward``, ``utility``, ``attack``, ``pool_loss``,
        ``pool_asr``; each this rank's share of the step's value)."""
        cfg, lm = self.settings, inputs.trainable.lm
        with _attacking(inputs.trainable.module):
            sampled, pool_loss, pool_asr = self.attack(lm, inputs.step)
        utility = self.utility(inputs)
        away, toward = self.adversarial(inputs, sampled)
        loss = cfg.away_weight * away + cfg.toward_weight * toward + cfg.utility_weight * utility
        world = inputs.world
        attack = float(self.pool.losses[list(sampled)].mean())
        terms = {
            "away": away.detach(),
            "toward": toward.detach(),
            "utility": utility.detach(),
            "attack": torch.tensor(attack / world),
            "pool_loss": torch.tensor(pool_loss / world),
            "pool_asr": torch.tensor(pool_asr / world),
        }
        return loss, terms


def _behaviours(settings: R2D2Config) -> tuple[list[str], list[str], list[str]]:
    """``(behaviours, targets, refusals)`` of the settings.

    Raises:
        SafegeomError: an empty or evaluation-only behaviour set (the prompt loader's and
            :func:`~safegeom.prompt_roles.check_trainable`'s messages).
    """
    prompts = load_prompts(settings.behaviours, n=settings.n_behaviours)
    check_trainable(prompts)
    behaviours = list(prompts.prompts)
    targets = [_target(settings.target_template, b) for b in behaviours]
    if settings.refusal is not None:
        refusals = [settings.refusal] * len(behaviours)
    elif prompts.completions is not None and all(c.strip() for c in prompts.completions):
        refusals = list(prompts.completions)
    else:
        refusals = [HARMBENCH_REFUSAL] * len(behaviours)
    return behaviours, targets, refusals


def base_answers(setup: Setup, settings: R2D2Config) -> tuple[str, ...]:
    """The frozen model's greedy answers to the task's prompts (at most ``answer_tokens``
    tokens, no system prompt), written to ``DIR/defence`` and read back when the run resumes.

    Raises:
        ArtifactError: a saved file whose answers do not match the task's prompts.
    """
    path = setup.folder / ANSWERS_FILE
    if setup.resume and path.is_file():
        saved = read_json(path, what="R2D2 base answers")
        if saved.get("prompts") != list(setup.prompts):
            raise ArtifactError(
                f"{path} answers other prompts than the task's; resume with the run's --task or "
                "--overwrite"
            )
        return tuple(saved["answers"])
    answers = generate(
        setup.lm, list(setup.prompts), max_new_tokens=settings.answer_tokens, progress=False
    )
    if setup.write:
        setup.folder.mkdir(parents=True, exist_ok=True)
        write_json(path, {"prompts": list(setup.prompts), "answers": list(answers)})
    return tuple(answers)


def prepare(setup: Setup, settings: R2D2Config) -> R2D2State:
    """Build the pool of test cases on the frozen model (random suffixes, seeded by the run's
    seed) and, by default, the base's answers of the utility loss; a resumed run reads the pool
    back when the model is wrapped.

    Raises:
        SafegeomError: an empty or evaluation-only behaviour set, a behaviour or target the
            attack cannot place.
    """
    behaviours, targets, refusals = _behaviours(settings)
    pool = build_pool(
        setup.lm,
        behaviours,
        targets,
        refusals,
        n_tokens=settings.suffix_tokens,
        seed=setup.seed,
    )
    record = {
        "method": setup.method,
        **config_dict(settings),
        "n_pool": len(pool),
        "pool_source": pool.source,
    }
    answered = None
    if settings.utility_answers == "base":
        answers = base_answers(setup, settings)
        answered = (tuple(setup.prompts), answers)
        record["answers_hash"] = sha256_text(json.dumps(list(answers)))
    return R2D2State(pool, settings, record, answered)


METHOD = Method(
    summary="docs/methods.md §12: HarmBench's R2D2, GCG pool attacked every step, away + toward "
    "+ utility loss",
    update=lambda settings: settings.update,
    prepare=prepare,
    config=R2D2Config,
    group="r2d2",
)
"""R2D2 adversarial training."""
