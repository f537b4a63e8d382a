"""safegeom: the safety geometry of language models.

Where refusal and harmfulness are carried inside a chat model, how fine-tuning moves and couples
them, and which internal changes cause the behaviour. The everyday API is importable from here:

    >>> import safegeom as sg
    >>> lm = sg.load_model("tiny-chat")
    >>> sets = ("advbench:train", "alpaca:train", "advbench:val", "alpaca:val")
    >>> config = sg.SelectionConfig(n_train=16, n_val=8, positions="-1")
    >>> selection = sg.refusal_direction(
    ...     lm, *(sg.load_prompts(s, n=16) for s in sets), config, progress=False
    ... )
    >>> harmful = sg.load_prompts("advbench:test", n=4)
    >>> short = sg.EvaluateConfig(max_new_tokens=8)
    >>> sg.evaluate(lm, harmful, short, progress=False).asr.value  # one answered
    0.25
    >>> with sg.Ablation(selection.carrier).on(lm):
    ...     result = sg.evaluate(lm, harmful, short, progress=False)
    >>> result.asr.value  # the direction ablated, three of the four are answered
    0.75

``sg.capture``, ``sg.evaluate`` and ``sg.train`` are plain functions; the modules that define
them are :mod:`safegeom.activations`, :mod:`safegeom.evaluation` and :mod:`safegeom.training`.
No module of the package imports this one, so the import graph stays acyclic.
"""

from safegeom.activations import Activations, ActivationStats, CaptureConfig, capture, capture_stats
from safegeom.artifacts import VERSION, Provenance
from safegeom.audit.result import AuditResult, load_audit
from safegeom.carriers import (
    Carrier,
    SelectionConfig,
    cheap_cone,
    harmfulness_direction,
    load_carrier,
    refusal_direction,
)
from safegeom.errors import SafegeomError
from safegeom.eval_result import EvalResult
from safegeom.evaluation import EvaluateConfig, evaluate
from safegeom.interventions import Ablation, Addition, AffineEdit
from safegeom.models import LayerSpec, LoadConfig, PositionSpec, load_model
from safegeom.prompts import PromptSet, load_prompts
from safegeom.sweeps import SweepConfig, SweepResult, causal_sweep
from safegeom.training import TrainConfig, load_trajectory, train

__version__ = VERSION
"""The installed package's version (pyproject.toml is its one source)."""

__all__ = [
    "Ablation",
    "ActivationStats",
    "Activations",
    "Addition",
    "AffineEdit",
    "AuditResult",
    "CaptureConfig",
    "Carrier",
    "EvalResult",
    "EvaluateConfig",
    "LayerSpec",
    "LoadConfig",
    "PositionSpec",
    "PromptSet",
    "Provenance",
    "SafegeomError",
    "SelectionConfig",
    "SweepConfig",
    "SweepResult",
    "TrainConfig",
    "__version__",
    "capture",
    "capture_stats",
    "causal_sweep",
    "cheap_cone",
    "evaluate",
    "harmfulness_direction",
    "load_audit",
    "load_carrier",
    "load_model",
    "load_prompts",
    "load_trajectory",
    "refusal_direction",
    "train",
]
