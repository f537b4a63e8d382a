"""Safe LoRA and LoX as training methods (METHODS §8): LoRA, transformed at every checkpoint.

Both are training-free and need the unaligned base (``--unaligned-base``) beside the aligned
model being fine-tuned. The run trains plain LoRA; each checkpoint saves the transformed model
(what ``load_model`` reads) and the raw adapter in ``raw_adapter/`` (what ``--resume`` reads), so
resuming stays bit-for-bit.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PosthocConfig"]


@dataclass(frozen=True)
class PosthocConfig:
    """Settings of the ``safe-lora`` and ``lox`` methods (``safegeom train safe-lora|lox``)."""

    unaligned_base: str | None = None
    """The unaligned base model the aligned MODEL was trained from (required by safe-lora, lox)."""
