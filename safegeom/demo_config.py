"""The sizes of ``safegeom demo``: :class:`DemoConfig`, the per-model presets its unset sizes come
from (:data:`DEMO_PRESETS`), and the tiny-chat report's pointer to the real-model run."""

from __future__ import annotations

from dataclasses import dataclass, replace

from safegeom.config import check

__all__ = ["DEMO_PRESETS", "REAL_MODEL_RUN", "SIZE_FIELDS", "DemoConfig"]

REAL_MODEL_RUN = (
    "The same story on a real model: `safegeom demo --model smol-chat` (SmolLM2-135M-Instruct "
    "with the project's safety LoRA, at the smol-chat sizes of `safegeom.demo.DEMO_PRESETS`) "
    "took 22.1 min wall on a 2-core CPU with one torch thread beside another job; README.md, "
    'section "The demo on smol-chat", describes its results.'
)
"""The line of tiny-chat's report saying where the real-model run is (its measured wall time)."""

SIZE_FIELDS: tuple[str, ...] = (
    "n_eval",
    "n_train",
    "n_val",
    "n_random",
    "lora_steps",
    "save_every",
    "max_new_tokens",
)
"""The :class:`DemoConfig` fields a model's preset fills in (when left unset)."""

DEMO_PRESETS: dict[str, dict[str, int]] = {
    "tiny-chat": {
        "n_eval": 32,
        "n_train": 64,
        "n_val": 32,
        "n_random": 20,
        "lora_steps": 60,
        "save_every": 20,
        "max_new_tokens": 24,
    },
    "smol-chat": {
        "n_eval": 8,
        "n_train": 32,
        "n_val": 4,
        "n_random": 20,
        "lora_steps": 20,
        "save_every": 20,
        "max_new_tokens": 16,
    },
}
"""The demo's sizes per model, for the :data:`SIZE_FIELDS` left unset (``None``): tiny-chat's
finish in a few minutes on a 2-core CPU, smol-chat's (SmolLM2-135M-Instruct, 30 layers, the
138 direction candidates inside the layer range each scored on ``n_val`` prompts per class) in about
22 (22.1 measured); any other model gets tiny-chat's."""


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; a size left unset (``None``) comes from the model's preset
    (:data:`DEMO_PRESETS`), so the defaults finish in a few minutes on a 2-core CPU on tiny-chat
    and in about 22 minutes on smol-chat."""

    model: str = "tiny-chat"
    """MODEL to tell the story of: tiny-chat, smol-chat, a checkpoint folder or a hub id (an
    adapter is merged into its base before the LoRA fine-tuning)."""
    n_eval: int | None = None
    """Prompts per behaviour set, here and in the audit, and the audit's task-safety interference
    examples (default: the model's preset; tiny-chat 32, smol-chat 8)."""
    n_train: int | None = None
    """Prompts per class for the carriers' means (default: the model's preset; tiny-chat 64,
    smol-chat 32)."""
    n_val: int | None = None
    """Prompts per class for selection and the ablation check (default: the model's preset;
    tiny-chat 32, smol-chat 4)."""
    n_random: int | None = None
    """Matched random directions in the ablation check (default: the model's preset; 20)."""
    lora_steps: int | None = None
    """Optimizer steps of the harmful LoRA fine-tuning (default: the model's preset; tiny-chat
    60, smol-chat 20)."""
    audit: bool = True
    """Audit the LoRA trajectory against the base and draw the audit's figures into the report."""
    save_every: int | None = None
    """Checkpoint interval of the harmful LoRA trajectory, in steps (default: the model's
    preset; 20)."""
    max_new_tokens: int | None = None
    """Tokens generated per prompt when judging behaviour (default: the model's preset;
    tiny-chat 24, smol-chat 16)."""
    seed: int = 0
    """Seed of the random controls and the LoRA run."""

    def __post_init__(self) -> None:
        for name in SIZE_FIELDS:
            value = getattr(self, name)
            check(value is None or value >= 1, name, "must be at least 1", value)

    @property
    def preset(self) -> str:
        """The name of the :data:`DEMO_PRESETS` entry the unset sizes come from: the model's
        own, else ``tiny-chat``."""
        return self.model if self.model in DEMO_PRESETS else "tiny-chat"

    def resolved(self) -> DemoConfig:
        """This config with every unset size filled in from :attr:`preset`.

        Returns:
            A :class:`DemoConfig` whose :data:`SIZE_FIELDS` are all set.
        """
        sizes = DEMO_PRESETS[self.preset]
        return replace(
            self, **{name: sizes[name] for name in SIZE_FIELDS if getattr(self, name) is None}
        )
