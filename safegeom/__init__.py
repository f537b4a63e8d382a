"""safegeom: the safety geometry of language models.

Where refusal and harmfulness are carried inside a chat model, how fine-tuning moves and couples
them, and which internal changes cause the behaviour. The everyday API is importable from here:

    >>> import safegeom as sg
    >>> lm = sg.load_model("tiny-chat")                                  # doctest: +SKIP
    >>> r = sg.refusal_direction(lm).carrier                             # doctest: +SKIP
    >>> with sg.Ablation(r).on(lm):                                      # doctest: +SKIP
    ...     result = sg.evaluate(lm, sg.load_prompts("advbench:test"))

Three of these names are also names of modules (``capture``, ``evaluate``, ``train``): here they
are the functions. Import the modules by their full path (``from safegeom.capture import
capture_stats``); ``import safegeom.capture as m`` would give the function.
No module of the package imports this one, so the import graph stays acyclic.
"""

from safegeom.artifacts import Provenance
from safegeom.capture import Activations, ActivationStats, CaptureConfig, capture, capture_stats
from safegeom.carriers import (
    Carrier,
    SelectionConfig,
    cheap_cone,
    harmfulness_direction,
    load_carrier,
    refusal_direction,
)
from safegeom.errors import SafegeomError
from safegeom.evaluate import evaluate
from safegeom.interventions import Ablation, Addition, AffineEdit
from safegeom.models import LayerSpec, LoadConfig, PositionSpec, load_model
from safegeom.prompts import PromptSet, load_prompts
from safegeom.results import EvalResult
from safegeom.sweeps import SweepConfig, SweepResult, causal_sweep
from safegeom.train import TrainConfig, load_trajectory, train

__version__ = "0.1.0"

__all__ = [
    "Ablation",
    "ActivationStats",
    "Activations",
    "Addition",
    "AffineEdit",
    "CaptureConfig",
    "Carrier",
    "EvalResult",
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
    "load_carrier",
    "load_model",
    "load_prompts",
    "load_trajectory",
    "refusal_direction",
    "train",
]
