"""LoRA fine-tuning: adapters on ``lora_targets``, the LM loss on answer tokens, no defence."""

from __future__ import annotations

from typing import Any

from safegeom.training.methods.base import Method, Prepared, Setup, fixed

__all__ = ["METHOD"]


def prepare(setup: Setup, settings: Any = None) -> Prepared:
    """Nothing to fit: plain training of LoRA adapters."""
    return Prepared("lora")


METHOD = Method(summary="LoRA adapters on --lora-targets", update=fixed("lora"), prepare=prepare)
"""LoRA fine-tuning (checkpoints are adapter folders naming their base)."""
