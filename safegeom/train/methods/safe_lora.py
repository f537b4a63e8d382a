"""Safe LoRA as a training method (docs/methods.md §8): LoRA, each checkpoint projected.

The run trains plain LoRA; every checkpoint saves the projected adapter (what ``load_model``
reads) and the raw adapter for resuming (:mod:`safegeom.train.posthoc`). Needs the unaligned
base (``--unaligned-base``).
"""

from __future__ import annotations

from safegeom.errors import ConfigError
from safegeom.train.methods.base import Method, Prepared, Setup, fixed
from safegeom.train.posthoc import PosthocConfig, prepare_safe_lora

__all__ = ["METHOD", "needs_unaligned_base"]


def needs_unaligned_base(settings: PosthocConfig, method: str) -> None:
    """Refuse settings without the unaligned base, before any work.

    Raises:
        ConfigError: ``unaligned_base`` is not set (the message names ``--unaligned-base``).
    """
    if settings.unaligned_base is None:
        raise ConfigError(
            f"{method} needs --unaligned-base: the unaligned model MODEL was aligned from "
            "(docs/methods.md §8 transforms the update with W_aligned − W_unaligned)"
        )


def prepare(setup: Setup, settings: PosthocConfig) -> Prepared:
    """Load the unaligned base and build the projection every checkpoint goes through."""
    record, export = prepare_safe_lora(setup.method, setup.lm, settings, setup.load)
    return Prepared("lora", record, export)


METHOD = Method(
    summary="docs/methods.md §8: LoRA, each checkpoint Safe-LoRA projected; needs --unaligned-base",
    update=fixed("lora"),
    prepare=prepare,
    config=PosthocConfig,
    keyword="posthoc",
    group="weight-space baselines",
    check=needs_unaligned_base,
)
"""Safe LoRA."""
