"""What a trajectory audit measures: :class:`AuditConfig` (drives ``safegeom audit`` too)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from safegeom.config import check, check_finite
from safegeom.errors import ConfigError
from safegeom.models.positions import LayerSpec

__all__ = ["FAMILIES", "AuditConfig"]

_RESERVED = "base"
"""The anchor name of the trajectory's own base (:data:`~safegeom.audit.schema.BASE_ANCHOR`)."""

FAMILIES = ("geometry", "causal", "behaviour")
"""Metric families: carriers and their drift/coupling, fixed-source causal tests, behaviour."""


@dataclass(frozen=True)
class AuditConfig:
    """What the audit measures at every checkpoint, and with which prompts.

    The base (the aligned model, step 0) is the reference for every drift and fixed-source
    number: its refusal direction r₀ is selected once (docs/methods.md §1), its harmfulness
    direction h₀ (§2) and cheap cone B₀ (§3) extracted once, and all three applied to every
    checkpoint.

    Example:
        >>> AuditConfig(n_per_class=16, generate=False).families
        ('geometry', 'causal', 'behaviour')
    """

    harmful: tuple[str, ...] = ("advbench:train", "jbb-harmful:train", "directharm4:train")
    """Harmful carrier prompt sets (bundled set[:split] or files), combined in order."""
    harmless: tuple[str, ...] = ("alpaca:train",)
    """Harmless carrier prompt sets, combined in order."""
    harmful_val: tuple[str, ...] = ("advbench:val",)
    """Harmful prompts for the base's direction selection and the causal tests."""
    harmless_val: tuple[str, ...] = ("alpaca:val",)
    """Harmless prompts for the base's direction selection, the causal tests and KL to the base."""
    behaviour_harmful: tuple[str, ...] = ("advbench:test", "jbb-harmful:test", "directharm4:test")
    """Held-out harmful sets: refusal rate and ASR (substring judge)."""
    behaviour_harmless: tuple[str, ...] = ("alpaca:test",)
    """Held-out harmless sets: over-refusal (substring judge) and cross-entropy of completions."""
    completion_sets: tuple[str, ...] = ("gsm8k:test",)
    """Held-out harmless sets with reference completions: their cross_entropy (utility)."""
    xstest: bool = True
    """Also judge xstest-safe:test (over-refusal) and xstest-unsafe:test with the XSTest judge."""
    n_per_class: int = 64
    """Carrier prompts per class (first n of the combined set)."""
    n_val: int = 32
    """Validation prompts per class (selection on the base, causal tests, KL to the base)."""
    n_behaviour: int = 32
    """Prompts per held-out behaviour set (first n)."""
    layers: LayerSpec = LayerSpec("all")
    """Layers of the per-layer metrics: all, 5, -1, 2:6 (end-exclusive), 2-5 (inclusive), lists."""
    cone_k: int = 3
    """Dimension of the cheap refusal cone B (docs/methods.md §3)."""
    n_random: int = 20
    """Matched random directions per causal test (at least 20)."""
    judge: str = "substring"
    """Refusal judge of the harmful and Alpaca behaviour sets (substring, xstest, or a judge spec)."""
    max_new_tokens: int = 24
    """Tokens generated per prompt for behaviour."""
    generate: bool = True
    """Generate and judge behaviour; --no-generate gives a geometry-only audit."""
    reselect: bool = False
    """Also run the full selection (bypass, induce, KL) at every checkpoint (slow)."""
    families: tuple[str, ...] = FAMILIES
    """Metric families to run: geometry, causal, behaviour (comma list)."""
    task: str | None = None
    """Task whose held-out problems give task_accuracy (default: the trajectory's own task)."""
    attacks: tuple[str, ...] = field(default=(), metadata={"repeat": True, "metavar": "[NAME=]DIR"})
    """Attack sets (safegeom attack --out DIR; NAME=DIR names one) replayed at every checkpoint:
    ASR, target log-probability and refusal score, rows of source fixed-attack:NAME; repeat
    --attacks for several (docs/methods.md §11)."""
    anchors: tuple[str, ...] = field(
        default=(), metadata={"repeat": True, "flag": "--anchor", "metavar": "NAME=MODEL"}
    )
    """Further references (NAME=MODEL; a mapping NAME → MODEL in Python): each anchor's carriers
    are extracted as the base's are, and every geometry row is measured against each anchor too
    (its ``anchor`` column names it; the base's rows say ``base``). An anchor must share the
    base's hidden size, tokenizer and chat template; repeat --anchor for several
    (docs/methods.md §5)."""
    n_resamples: int = 1000
    """Bootstrap resamples of every confidence interval (the geometry rows' too: each resample
    refits the carriers), and random splits or directions of every noise-floor row."""
    saturation_margin: float = 0.02
    """A causal cell is flagged ``saturated`` when its un-intervened refusal probability
    σ(mean refusal score) is within this of the end its intervention pushes toward (0 for
    ablation, 1 for addition); probability units, in (0, 0.5)."""
    interference: bool = True
    """Measure task–safety interference with the geometry family (docs/methods.md §14, our
    proposal): the gradient cosines where the trajectory names its task, and the share of the
    activation change on harmful prompts inside the base's cone; --no-interference skips it."""
    interference_n: int = 32
    """Task training examples, and harmful carrier prompts, behind the gradient interference
    (the first n of each, in one forward and one backward pass)."""
    batch_size: int | None = None
    """Prompts per forward pass (default: chosen from the memory available)."""
    seed: int = 0
    """Seed of the random controls and the bootstrap."""
    system: str | None = None
    """System prompt for every prompt."""
    threads: int | None = None
    """torch CPU threads (default: one per free core, or the count the user set through
    OMP_NUM_THREADS or torch.set_num_threads; see safegeom.threads); restored afterwards."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", LayerSpec.parse(self.layers))
        attacks = (self.attacks,) if isinstance(self.attacks, str) else tuple(self.attacks)
        object.__setattr__(self, "attacks", attacks)
        object.__setattr__(self, "anchors", _anchor_specs(self.anchors))
        for name in ("harmful", "harmless", "harmful_val", "harmless_val"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            check(len(getattr(self, name)) > 0, name, "needs at least one prompt set")
        for name in (
            "n_per_class",
            "n_val",
            "n_behaviour",
            "cone_k",
            "max_new_tokens",
            "interference_n",
        ):
            check(getattr(self, name) >= 1, name, "must be at least 1", getattr(self, name))
        check(self.n_random >= 20, "n_random", "must be at least 20 controls", self.n_random)
        check(self.n_resamples >= 100, "n_resamples", "must be at least 100", self.n_resamples)
        check(
            0.0 < self.saturation_margin < 0.5,
            "saturation_margin",
            "must lie in (0, 0.5) (a refusal probability)",
            self.saturation_margin,
        )
        check(
            self.threads is None or self.threads >= 1, "threads", "must be at least 1", self.threads
        )
        check(
            self.batch_size is None or self.batch_size >= 1,
            "batch_size",
            "must be at least 1",
            self.batch_size,
        )
        unknown = [f for f in self.families if f not in FAMILIES]
        check(not unknown, "families", f"takes {', '.join(FAMILIES)}", ",".join(unknown))
        check(len(self.families) > 0, "families", "needs at least one family")
        check_finite(float(self.seed), "seed")

    @property
    def anchor_models(self) -> dict[str, str]:
        """Anchor name → model, in the order given.

        Example:
            >>> AuditConfig(anchors={"seed1": "runs/seed1"}).anchor_models
            {'seed1': 'runs/seed1'}
        """
        return dict(spec.split("=", 1) for spec in self.anchors)

    @property
    def behaviour_sets(self) -> dict[str, tuple[str, str]]:
        """Held-out set → (role ``harmful``/``harmless``, judge), in report order."""
        sets = {s: ("harmful", self.judge) for s in self.behaviour_harmful}
        sets.update({s: ("harmless", self.judge) for s in self.behaviour_harmless})
        if self.xstest:
            sets.update({"xstest-safe:test": ("harmless", "xstest")})
            sets.update({"xstest-unsafe:test": ("harmful", "xstest")})
        return sets


def _refuse(message: str, value: str) -> None:
    raise ConfigError(f"anchors (--anchor) {message}, got {value!r}")


def _anchor_specs(anchors: object) -> tuple[str, ...]:
    """``anchors`` (one NAME=MODEL, several, or a mapping) as a tuple of NAME=MODEL, checked."""
    if isinstance(anchors, Mapping):
        specs = tuple(f"{name}={model}" for name, model in anchors.items())
    elif isinstance(anchors, str):
        specs = (anchors,)
    else:
        specs = tuple(str(a) for a in anchors)  # type: ignore[union-attr]
    names: list[str] = []
    for spec in specs:
        name, _, model = spec.partition("=")
        name, model = name.strip(), model.strip()
        if not (name and model):
            _refuse(
                "takes NAME=MODEL (e.g. --anchor seed1=runs/seed1/checkpoints/step-000100)", spec
            )
        if name == _RESERVED:
            _refuse(f"cannot use the name {_RESERVED!r}, the base's; rename the anchor", spec)
        if name in names:
            _refuse("names each anchor once; rename one of them", name)
        names.append(name)
    return tuple(f"{n}={s.partition('=')[2].strip()}" for n, s in zip(names, specs, strict=True))
