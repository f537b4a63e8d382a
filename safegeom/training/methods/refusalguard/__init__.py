"""RefusalGuard (docs/methods.md §6, our proposal): a training method that holds the refusal cones.

:mod:`.geometry` holds its settings (:class:`GuardConfig`), the cone bases and the geometry
penalty; :mod:`.method` the method (fit on the frozen model, the penalised step, the edit or LoRA
it trains). The edit's model-side code (:class:`~safegeom.models.reft.ReftEdit`, its hooks and
checkpoint files) stays in :mod:`safegeom.models`, because ``load_model`` reads a RefusalGuard
checkpoint as a model and the models package is below training in the import graph.
"""

from safegeom.training.methods.refusalguard.geometry import (
    READOUT,
    GeometryPenalty,
    GuardConfig,
    calibration_sets,
    fit_guard_cones,
    guard_layers,
)
from safegeom.training.methods.refusalguard.method import CONES_FILE, METHOD, GuardState

__all__ = [
    "CONES_FILE",
    "METHOD",
    "READOUT",
    "GeometryPenalty",
    "GuardConfig",
    "GuardState",
    "calibration_sets",
    "fit_guard_cones",
    "guard_layers",
]
