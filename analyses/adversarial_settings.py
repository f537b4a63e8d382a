"""The SFT-vs-R2D2 study's sizes (:mod:`analyses.adversarial`): the full tiny-chat study's
(:class:`Settings`' defaults), the smol-chat study's (:data:`SMOL`, cut to about half an hour
on one CPU thread) and the smoke test's (:data:`QUICK`); :func:`study_settings` picks one for a
model."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MODELS", "QUICK", "SMOL", "Settings", "default_seeds", "study_settings"]


@dataclass(frozen=True)
class Settings:
    """The study's sizes (the defaults are the full study's; :data:`QUICK` the test's)."""

    steps: int = 80
    """Optimizer steps per run."""
    save_every: int = 10
    """Checkpoint interval, steps."""
    lr: float = 5e-3
    """Peak learning rate of both recipes (LoRA)."""
    batch: int = 8
    """Utility examples per step."""
    attacked: int = 2
    """Behaviours per step: R2D2's attacked test cases; SFT's batch holds as many in expectation."""
    n_behaviours: int = 16
    """First ``harmbench-train`` behaviours trained on (R2D2's pool size)."""
    n_utility: int = 64
    """First ``alpaca:train`` instructions of the utility data."""
    answer_tokens: int = 64
    """Longest base answer of the utility data, tokens."""
    r2d2_gcg_steps: int = 1
    """m: GCG steps per R2D2 training step."""
    r2d2_width: int = 64
    """GCG candidates per R2D2 attack step (top-k the same)."""
    suffix_tokens: int = 20
    """Tokens of R2D2's adversarial suffixes."""
    reset_every: int = 20
    """K: R2D2 redraws 20% of its pool every K steps."""
    n_attack: int = 16
    """First ``harmbench:val`` behaviours of the fixed-source attack sets."""
    gcg_tokens: int = 20
    """Tokens of the fixed-source GCG suffix."""
    gcg_steps: int = 25
    """Steps of the fixed-source GCG (it stops early once the target is greedy)."""
    gcg_width: int = 32
    """Candidates per fixed-source GCG step (top-k the same)."""
    autodan_population: int = 8
    """AutoDAN-style population."""
    autodan_generations: int = 4
    """AutoDAN-style generations."""
    attack_tokens: int = 24
    """Tokens of the source's answer the attack judge reads (the audit's max_new_tokens too)."""
    n_per_class: int = 32
    """Audit: carrier prompts per class."""
    n_val: int = 16
    """Audit: validation prompts per class (selection, causal tests, KL)."""
    n_behaviour: int = 24
    """Audit: prompts per held-out behaviour set."""
    n_resamples: int = 200
    """Audit: bootstrap resamples of every CI."""


QUICK = Settings(
    steps=4,
    save_every=2,
    batch=4,
    attacked=1,
    n_behaviours=4,
    n_utility=8,
    answer_tokens=16,
    r2d2_width=16,
    suffix_tokens=8,
    reset_every=2,
    n_attack=2,
    gcg_tokens=8,
    gcg_steps=2,
    gcg_width=16,
    autodan_population=4,
    autodan_generations=1,
    attack_tokens=12,
    n_per_class=8,
    n_val=4,
    n_behaviour=4,
    n_resamples=100,
)
"""The smoke test's sizes (seconds; the test uses them)."""


SMOL = Settings(
    steps=30,
    save_every=10,
    lr=1e-3,
    batch=4,
    attacked=2,
    n_behaviours=8,
    n_utility=16,
    answer_tokens=32,
    r2d2_width=16,
    suffix_tokens=10,
    reset_every=10,
    n_attack=8,
    gcg_tokens=10,
    gcg_steps=8,
    gcg_width=16,
    autodan_population=4,
    autodan_generations=2,
    attack_tokens=16,
    n_per_class=16,
    n_val=4,
    n_behaviour=16,
    n_resamples=100,
)
"""The smol-chat study's sizes: SmolLM2-135M's forward costs about 30x tiny-chat's, so fewer
steps, behaviours, utility rows and attack budgets, audit sets of 16 prompts and ``n_val`` 4 (the
base's direction selection is row by row); lr 1e-3, the LoRA lr of smol-chat's own build."""

MODELS: dict[str, Settings] = {"tiny-chat": Settings(), "smol-chat": SMOL}
"""The study's models and their sizes."""


def study_settings(model: str, quick: bool = False) -> Settings:
    """The sizes of ``model``'s study (:data:`QUICK` for every model when ``quick``).

    Returns:
        The :class:`Settings`.

    Raises:
        ValueError: ``model`` is not one of :data:`MODELS`.
    """
    if model not in MODELS:
        raise ValueError(f"--model {model}: the study knows {', '.join(MODELS)}")
    return QUICK if quick else MODELS[model]


def default_seeds(model: str) -> str:
    """The seeds run unless ``--seeds`` is given: 0, 1, 2 on tiny-chat, 0 alone on smol-chat
    (CPU time; its anchors are then the base alone).

    Returns:
        A comma list.
    """
    return "0,1,2" if model == "tiny-chat" else "0"
