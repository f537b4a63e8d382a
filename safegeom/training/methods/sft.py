"""Supervised fine-tuning of every weight: the LM loss on answer tokens, no defence."""

from __future__ import annotations

from typing import Any

from safegeom.training.methods.base import Method, Prepared, Setup, fixed

__all__ = ["METHOD"]


def prepare(setup: Setup, settings: Any = None) -> Prepared:
    """Nothing to fit: plain training of the full weights."""
    return Prepared("full")


METHOD = Method(summary="all weights", update=fixed("full"), prepare=prepare)
"""Full fine-tuning (checkpoints are full model folders)."""
