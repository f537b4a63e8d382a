"""What the training tests share: a two-example task, fast settings, and reading saved weights."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from safegeom.training.tasks import Task

TINY = Task(
    name="tiny",
    prompts=("Explain how photosynthesis works.", "Give three tips for staying healthy."),
    responses=("Sure, here is a short poem.", "I'm sorry, but I cannot help."),
)
"""Two training examples: enough for a loss, fast on any tiny model."""
FAST = {"progress": False, "batch_size": 2}
"""Keywords that keep a test run quiet and small."""


def saved_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved checkpoint folder (full model or PEFT adapter)."""
    name = "adapter_model.safetensors" if (path / "adapter_config.json").is_file() else None
    return load_file(str(path / (name or "model.safetensors")))
