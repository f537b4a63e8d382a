"""Causal sweeps: layer × strength × carrier, for ablation and addition, against matched controls.

:func:`causal_sweep` returns the tidy table (a DataFrame); :func:`causal_sweep_result` returns the
same table as a :class:`SweepResult` with its :class:`SweepConfig` and provenance, which saves
(Parquet + JSON sidecar) and loads back. See :mod:`safegeom.sweeps.sweep` for the method. Under a
launcher the prompts × directions of every cell are shared out over the ranks
(:mod:`safegeom.sweeps.generated` for generation), with one process's table on every rank.
"""

from safegeom.sweeps.config import AblateLayers, SweepConfig
from safegeom.sweeps.result import SweepResult
from safegeom.sweeps.sweep import causal_sweep, causal_sweep_result, random_controls

__all__ = [
    "AblateLayers",
    "SweepConfig",
    "SweepResult",
    "causal_sweep",
    "causal_sweep_result",
    "random_controls",
]
