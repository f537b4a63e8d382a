"""The defence study's settings (:mod:`analyses.defences`): methods, tasks, learning-rate grids and
sizes, one :class:`Preset` per model.

``tiny-chat`` (issue 12) runs the full protocol: seven methods × four tasks × three seeds, a
learning-rate grid per method, the λ_geom ablation, 200 steps. ``smol-chat`` (issue 22, item 4)
is the same protocol cut to what one CPU core does in about an hour and a half, fixed before the
run: seed 0, 50 steps, one learning rate per method chosen a priori (no grid: a grid triples the
cost), no λ ablation, smaller held-out samples, the benign task with four methods (LoRA,
RefusalGuard's LoRA variant, Safe LoRA, LoX), and Safe LoRA and LoX added, with
SmolLM2-135M-Instruct (``smollm2-135m-instruct``) as the unaligned base that smol-chat's own
recipe aligned.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from analyses.defences_eval import EvalSizes

__all__ = [
    "DEFAULT_LAMBDA",
    "GRIDS",
    "LAMBDAS",
    "METHODS",
    "PRESETS",
    "TASKS",
    "Preset",
    "RunSpec",
    "Settings",
    "spec",
    "train_kwargs",
]

METHODS: tuple[str, ...] = (
    "lora",
    "sft",
    "rg-lora",
    "rg-lora-both",
    "rg-reft",
    "adaptive",
    "kl",
    "safe-lora",
    "lox",
)
"""Every method the study knows, in table order (``safe-lora`` and ``lox`` need an unaligned
base: :attr:`Settings.unaligned_base`)."""
TASKS: tuple[str, ...] = ("harmful", "mix", "sentiment", "arith")
"""Every task the study knows, in table order."""
GRIDS: dict[str, tuple[float, ...]] = {
    "lora": (1e-3, 2e-3, 5e-3),
    "rg-lora": (1e-3, 2e-3, 5e-3),
    "rg-lora-both": (1e-3, 2e-3, 5e-3),
    "adaptive": (1e-3, 2e-3, 5e-3),
    "kl": (1e-3, 2e-3, 5e-3),
    "rg-reft": (5e-3, 1e-2, 2e-2),
    "sft": (1e-5, 3e-5, 1e-4),
}
"""tiny-chat's learning-rate grid per method (the search rule)."""
LAMBDAS: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0, 3.0)
"""λ_geom values of the ablation (0.3 is the default, the main grid's rg-lora)."""
DEFAULT_LAMBDA = 0.3
"""GuardConfig's default λ_geom."""
NEEDS_UNALIGNED: tuple[str, ...] = ("safe-lora", "lox")
"""Methods that read the unaligned base."""


@dataclass(frozen=True)
class Settings:
    """Training and evaluation settings shared by every run of one study."""

    steps: int = 200
    """Optimizer steps per run."""
    save_every: int = 50
    """Checkpoint interval, steps."""
    batch_size: int = 8
    """Examples per step."""
    model: str = "tiny-chat"
    """The aligned model every run fine-tunes (a shipped adapter is merged first)."""
    unaligned_base: str | None = None
    """The model the aligned one was aligned from (Safe LoRA's and LoX's ΔW); None: neither
    method can run."""
    sizes: EvalSizes = field(default_factory=EvalSizes)
    """Held-out prompts judged per checkpoint."""
    every_checkpoint: tuple[str, ...] | None = None
    """Methods whose seed-0 runs are evaluated at every checkpoint (None: all; the others at
    their last only)."""


@dataclass(frozen=True)
class Preset:
    """One model's study: its settings and what runs."""

    settings: Settings
    """Training and evaluation settings."""
    methods: tuple[str, ...]
    """Methods, in table order."""
    tasks: tuple[str, ...]
    """Tasks, in table order."""
    seeds: tuple[int, ...]
    """Training seeds."""
    grids: Mapping[str, tuple[float, ...]]
    """Learning-rate grid per method (one value: fixed before the run, no search)."""
    lambdas: tuple[float, ...]
    """λ_geom values of the ablation (empty: none)."""
    task_methods: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Tasks run with fewer methods than :attr:`methods` (task → its methods)."""
    audit_tasks: tuple[str, ...] = ("mix", "sentiment")
    """Tasks whose seed-0 runs are audited first."""
    audit: Mapping[str, Any] = field(default_factory=dict)
    """:class:`safegeom.audit.AuditConfig` fields of the study's audits (empty: the defaults)."""


PRESETS: dict[str, Preset] = {
    "tiny-chat": Preset(
        settings=Settings(),
        methods=tuple(m for m in METHODS if m not in NEEDS_UNALIGNED),
        tasks=TASKS,
        seeds=(0, 1, 2),
        grids=GRIDS,
        lambdas=LAMBDAS,
    ),
    "smol-chat": Preset(
        settings=Settings(
            steps=50,
            save_every=25,
            model="smol-chat",
            unaligned_base="smollm2-135m-instruct",
            sizes=EvalSizes(n_harmful=40, n_alpaca=50, n_task=100),
            every_checkpoint=("lora",),
        ),
        methods=("lora", "sft", "rg-lora", "rg-reft", "adaptive", "kl", "safe-lora", "lox"),
        tasks=("mix", "harmful", "sentiment"),
        seeds=(0,),
        grids={
            **{m: (2e-3,) for m in ("lora", "rg-lora", "adaptive", "kl", "safe-lora", "lox")},
            "rg-reft": (1e-2,),
            "sft": (2e-5,),
        },
        lambdas=(),
        task_methods={"harmful": ("lora",)},
        audit_tasks=("mix",),
        audit={
            "n_per_class": 32,
            "n_val": 8,
            "families": ("geometry", "causal"),
            "interference": False,
        },
    ),
}
"""The study per model (module docstring)."""


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study."""

    method: str
    """A :data:`METHODS` entry."""
    task: str
    """A :data:`TASKS` entry."""
    seed: int
    """Training seed."""
    lr: float
    """Learning rate."""
    lam: float | None = None
    """λ_geom (rg-lora only; None elsewhere)."""

    @property
    def name(self) -> str:
        """The run's folder name, e.g. ``rg-lora-mix-lr0.005-lam0.3-s0``."""
        lam = "" if self.lam is None else f"-lam{self.lam:g}"
        return f"{self.method}-{self.task}-lr{self.lr:g}{lam}-s{self.seed}"


def spec(method: str, task: str, seed: int, lr: float, lam: float | None = None) -> RunSpec:
    """A :class:`RunSpec`, giving rg-lora the default λ_geom when none is given."""
    if method == "rg-lora" and lam is None:
        lam = DEFAULT_LAMBDA
    return RunSpec(method, task, seed, lr, lam)


def train_kwargs(run: RunSpec, settings: Settings = Settings()) -> dict[str, Any]:
    """The :func:`safegeom.training.train` keywords of a run's method (``method`` and its
    ``settings``).

    Raises:
        ValueError: ``safe-lora`` or ``lox`` without an unaligned base in ``settings``.
    """
    from safegeom.training.methods.refusalguard import GuardConfig
    from safegeom.training.posthoc import PosthocConfig
    from safegeom.training.regularised import RegConfig

    if run.method in NEEDS_UNALIGNED:
        if settings.unaligned_base is None:
            raise ValueError(
                f"{run.method} needs the unaligned base; {settings.model} has none in this study"
            )
        posthoc = PosthocConfig(unaligned_base=settings.unaligned_base)
        return {"method": run.method, "settings": posthoc}
    if run.method == "rg-lora":
        settings_ = GuardConfig(variant="lora", lambda_geom=run.lam)
        return {"method": "refusalguard", "settings": settings_}
    if run.method == "rg-lora-both":  # the penalty holds the harmless calibration prompts too
        return {
            "method": "refusalguard",
            "settings": GuardConfig(variant="lora", penalise_harmless=True),
        }
    if run.method == "rg-reft":
        return {"method": "refusalguard", "settings": GuardConfig(variant="reft")}
    if run.method == "kl":
        return {"method": "kl", "settings": RegConfig(kl_weight=1.0)}
    return {"method": run.method}
