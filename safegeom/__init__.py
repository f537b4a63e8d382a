"""safegeom: the safety geometry of language models.

Where refusal and harmfulness are carried inside a chat model, how fine-tuning moves and couples
them, and which internal changes cause the behaviour. The everyday API is importable from here:

    >>> import safegeom as sg
    >>> lm = sg.load_model("tiny-chat")                                  # doctest: +SKIP
    >>> r = sg.refusal_direction(lm).carrier                             # doctest: +SKIP
    >>> with sg.Ablation(r).on(lm):                                      # doctest: +SKIP
    ...     result = sg.evaluate(lm, sg.load_prompts("advbench:test"))

Names are imported on first use, so ``import safegeom`` stays cheap and no module of the package
imports another through this one.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "LoadConfig": "safegeom.models",
    "LayerSpec": "safegeom.models",
    "PositionSpec": "safegeom.models",
    "load_model": "safegeom.models",
    "load_prompts": "safegeom.prompts",
    "PromptSet": "safegeom.prompts",
    "capture": "safegeom.capture",
    "capture_stats": "safegeom.capture",
    "Carrier": "safegeom.carriers",
    "load_carrier": "safegeom.carriers",
    "refusal_direction": "safegeom.carriers",
    "harmfulness_direction": "safegeom.carriers",
    "cheap_cone": "safegeom.carriers",
    "SelectionConfig": "safegeom.carriers",
    "Ablation": "safegeom.interventions",
    "Addition": "safegeom.interventions",
    "AffineEdit": "safegeom.interventions",
    "evaluate": "safegeom.evaluate",
    "causal_sweep": "safegeom.sweeps",
    "SweepConfig": "safegeom.sweeps",
    "train": "safegeom.train",
    "TrainConfig": "safegeom.train",
    "load_trajectory": "safegeom.train",
    "Provenance": "safegeom.artifacts",
    "SafegeomError": "safegeom.errors",
}
"""Public name → the module that defines it."""

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'safegeom' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
