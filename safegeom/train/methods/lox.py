"""LoX as a training method (docs/methods.md §8): LoRA, each checkpoint extrapolated by LoX.

The run trains plain LoRA; every checkpoint saves the fine-tuned model with the LoX
extrapolation added (a full model folder) and the raw adapter for resuming
(:mod:`safegeom.train.posthoc`). Needs the unaligned base (``--unaligned-base``).
"""

from __future__ import annotations

from safegeom.train.methods.base import Method, Prepared, Setup, fixed
from safegeom.train.methods.safe_lora import needs_unaligned_base
from safegeom.train.posthoc import PosthocConfig, prepare_lox

__all__ = ["METHOD"]


def prepare(setup: Setup, settings: PosthocConfig) -> Prepared:
    """Load the unaligned base and build the extrapolation every checkpoint goes through."""
    record, export = prepare_lox(setup.method, setup.lm, settings, setup.load)
    return Prepared("lora", record, export)


METHOD = Method(
    summary="docs/methods.md §8: LoRA, each checkpoint extrapolated by LoX; needs --unaligned-base",
    update=fixed("lora"),
    prepare=prepare,
    config=PosthocConfig,
    keyword="posthoc",
    group="weight-space baselines",
    check=needs_unaligned_base,
)
"""LoX."""
