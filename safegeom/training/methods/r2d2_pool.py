"""R2D2's pool of test cases: one adversarial suffix (token ids) per training behaviour.

The pool is what R2D2 (docs/methods.md §12) keeps attacking while the model trains. Each test case
is a behaviour's chat prompt cut around its suffix (an
:class:`~safegeom.attacks.slots.AttackSlot`), the suffix's current token ids, the affirmative
target the attack pushes toward, and the refusal the model is trained toward. The pool:

- starts at random: every suffix is ``n_tokens`` tokens drawn from the attack's allowed tokens by a
  generator seeded from the run's seed and the behaviour's index (a draw whose text does not
  tokenize back to its ids is drawn again, up to :data:`DRAWS` times, then the slot's
  ``"x x ... x"`` is kept);
- is advanced by :func:`~safegeom.attacks.gcg.advance` on the behaviours a step samples
  (:meth:`AttackPool.advance`);
- resets a fraction of its suffixes to fresh random draws (:meth:`AttackPool.reset`);
- saves itself beside every checkpoint (``r2d2_pool.safetensors``: the ids and the last attack
  losses; ``r2d2_pool.json``: the step it is at and what it was built from) and loads back
  exactly, so a resumed run continues with the pool the uninterrupted run had.

Every random draw comes from its own CPU generator seeded by (seed, step, behaviour), never from
the global generators, so the pool does not depend on what else the run draws.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from safegeom.artifacts import read_safetensors, save_safetensors, sha256_text, write_json
from safegeom.attacks.gcg import GCGConfig, advance
from safegeom.attacks.slots import AttackSlot, allowed_tokens, build_slot, decode_ids, round_trips
from safegeom.errors import ArtifactError
from safegeom.models.loading import LoadedModel
from safegeom.training.data import encode_examples

__all__ = ["DRAWS", "POOL_FILE", "POOL_JSON", "AttackPool", "build_pool", "pool_seed"]

POOL_FILE = "r2d2_pool.safetensors"
"""The pool's tensors in a checkpoint folder (suffix ids, last attack losses)."""
POOL_JSON = "r2d2_pool.json"
"""The pool's step and provenance in a checkpoint folder."""
DRAWS = 32
"""Random draws tried per suffix before falling back to the slot's initial string."""


def pool_seed(seed: int, step: int, index: int, what: int) -> int:
    """The seed of one draw: the run's ``seed``, the ``step``, the behaviour ``index`` and ``what``
    is drawn (0 initial suffix, 1 GCG candidates, 2 reset choice, 3 step's sample).

    Example:
        >>> pool_seed(0, 3, 1, 1) != pool_seed(0, 3, 2, 1)
        True
    """
    return ((seed * 1_000_003 + step) * 65_537 + index) * 8 + what


@dataclass
class AttackPool:
    """The test cases of a run (see the module docstring): slots, current suffixes and losses."""

    tokenizer: Any
    """The model's tokenizer (round-trip checks, the suffixes' text)."""
    slots: tuple[AttackSlot, ...]
    """One slot per behaviour (its prompt cut around the suffix, its affirmative target)."""
    refusals: tuple[tuple[int, ...], ...]
    """Per behaviour, the refusal's completion ids (response and end-of-turn token)."""
    ids: Int[Tensor, "n tokens"]
    """Current suffix ids, one row per behaviour (CPU, long)."""
    losses: Float[Tensor, " n"]
    """Each test case's target loss when it was last attacked (NaN: not yet attacked)."""
    allowed: Bool[Tensor, " vocab"]
    """Tokens a suffix may hold."""
    seed: int
    """The run's seed."""
    step: int = -1
    """The last step whose reset and attack the pool holds (-1: none yet)."""
    source: str = ""
    """sha256 of the behaviours, targets and refusals (checked when loading)."""
    initial: tuple[tuple[int, ...], ...] = field(default=())
    """The suffixes as first drawn (kept to show how far the attack moved them)."""

    def __len__(self) -> int:
        return len(self.slots)

    def draw(self, index: int, step: int) -> tuple[int, ...]:
        """A random suffix for behaviour ``index`` (seeded by the step): allowed tokens whose text
        round-trips in the prompt, or the slot's initial string after :data:`DRAWS` failures."""
        slot = self.slots[index]
        generator = torch.Generator().manual_seed(pool_seed(self.seed, step, index, 0))
        choices = self.allowed.nonzero().flatten()
        n = len(slot.opt_ids)
        for _ in range(DRAWS):
            row = choices[torch.randint(0, len(choices), (n,), generator=generator)]
            if bool(round_trips(self.tokenizer, slot, row[None])[0]):
                return tuple(row.tolist())
        return slot.opt_ids

    def reset(self, step: int, fraction: float) -> list[int]:
        """Redraw ``round(fraction · n)`` suffixes (at least one when ``fraction`` > 0), chosen
        by a generator seeded by ``step``.

        Returns:
            The indices reset.
        """
        k = min(len(self), max(1 if fraction > 0 else 0, round(fraction * len(self))))
        generator = torch.Generator().manual_seed(pool_seed(self.seed, step, 0, 2))
        chosen = sorted(torch.randperm(len(self), generator=generator)[:k].tolist())
        for i in chosen:
            self.ids[i] = torch.tensor(self.draw(i, step + 1), dtype=torch.long)
            self.losses[i] = float("nan")
        return chosen

    def sample(self, step: int, n: int) -> list[int]:
        """The behaviours step ``step`` attacks and trains on: ``n`` of them (all when fewer),
        drawn without replacement by a generator seeded by the step, in ascending order."""
        generator = torch.Generator().manual_seed(pool_seed(self.seed, step, 0, 3))
        return sorted(torch.randperm(len(self), generator=generator)[: min(n, len(self))].tolist())

    def advance(
        self, lm: LoadedModel, indices: Sequence[int], step: int, m: int, config: GCGConfig
    ) -> list[float]:
        """Advance the test cases ``indices`` by ``m`` GCG steps against ``lm`` as it is now.

        Returns:
            Their target losses after the steps (nats per target token).
        """
        out = []
        for i in indices:
            generator = torch.Generator().manual_seed(pool_seed(self.seed, step, i, 1))
            moved = advance(
                lm,
                self.slots[i],
                self.ids[i].tolist(),
                m,
                config,
                generator,
                allowed=self.allowed,
            )
            self.ids[i] = torch.tensor(moved.ids, dtype=torch.long)
            self.losses[i] = moved.loss
            out.append(moved.loss)
        return out

    def prompt_ids(self, index: int) -> tuple[int, ...]:
        """Behaviour ``index``'s whole prompt with its current suffix."""
        return self.slots[index].prompt_ids(self.ids[index].tolist())

    def save(self, folder: Path) -> None:
        """Write the pool into ``folder`` (:data:`POOL_FILE`, :data:`POOL_JSON`), atomically."""
        tensors = {"ids": self.ids, "losses": self.losses}
        save_safetensors(folder / POOL_FILE, tensors, {"step": self.step, "source": self.source})
        record = {
            "step": self.step,
            "source": self.source,
            "behaviours": [s.behaviour for s in self.slots],
            "targets": [s.target for s in self.slots],
            "suffixes": [decode_ids(self.tokenizer, r) for r in self.ids.tolist()],
        }
        write_json(folder / POOL_JSON, record)

    def load(self, folder: Path) -> None:
        """Replace the suffixes, losses and step by those saved in ``folder``.

        Raises:
            ArtifactError: no pool there, or one built from other behaviours, targets or refusals.
        """
        path = folder / POOL_FILE
        if not path.is_file():
            raise ArtifactError(
                f"{folder} holds no R2D2 pool ({POOL_FILE}); it was not written by an r2d2 run, "
                "so it cannot be resumed as one"
            )
        tensors, meta = read_safetensors(path, what="R2D2 pool")
        if meta.get("source") != self.source or tensors["ids"].shape != self.ids.shape:
            raise ArtifactError(
                f"the R2D2 pool in {folder} was built from other behaviours, targets or suffix "
                "lengths than this run's; resume with the run's settings or --overwrite"
            )
        self.ids = tensors["ids"].to(torch.long).clone()
        self.losses = tensors["losses"].to(torch.float32).clone()
        self.step = int(meta["step"])


def build_pool(
    lm: LoadedModel,
    behaviours: Sequence[str],
    targets: Sequence[str],
    refusals: Sequence[str],
    *,
    n_tokens: int,
    seed: int,
    allow_non_ascii: bool = False,
) -> AttackPool:
    """The initial pool: every behaviour's slot, refusal completion and random suffix.

    Returns:
        An :class:`AttackPool` at step -1.

    Raises:
        SafegeomError: a behaviour or target the attack cannot place (see
            :func:`~safegeom.attacks.slots.build_slot`).
    """
    slots = tuple(
        build_slot(lm, b, t, n_tokens=n_tokens) for b, t in zip(behaviours, targets, strict=True)
    )
    examples = encode_examples(
        lm.tokenizer, list(behaviours), list(refusals), chat_template=lm.chat_template
    )
    completions = tuple(tuple(e.input_ids[e.n_prompt :]) for e in examples)
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    allowed = allowed_tokens(lm.tokenizer, vocab, allow_non_ascii=allow_non_ascii)
    source = sha256_text(json.dumps([list(behaviours), list(targets), list(refusals), n_tokens]))
    n = len(slots)
    pool = AttackPool(
        tokenizer=lm.tokenizer,
        slots=slots,
        refusals=completions,
        ids=torch.zeros(n, n_tokens, dtype=torch.long),
        losses=torch.full((n,), float("nan")),
        allowed=allowed,
        seed=seed,
        source=source,
    )
    for i in range(n):
        pool.ids[i] = torch.tensor(pool.draw(i, 0), dtype=torch.long)
    pool.initial = tuple(tuple(r) for r in pool.ids.tolist())
    return pool
