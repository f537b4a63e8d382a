"""The checkpoint-trajectory audit: carriers, drift, coupling, causal tests and behaviour.

- :mod:`~safegeom.audit.config`: :class:`AuditConfig`, what is measured;
- :mod:`~safegeom.audit.schema`: the tidy table's columns and metric names;
- :mod:`~safegeom.audit.reference`: the base's carriers (:func:`build_reference`);
- :mod:`~safegeom.audit.measure`: one checkpoint's rows (:func:`measure_checkpoint`);
- :mod:`~safegeom.audit.inputs`: the base and checkpoints (:func:`resolve_inputs`);
- :mod:`~safegeom.audit.runner`: :func:`audit`, resumable, sharded by checkpoint under a launcher;
- :mod:`~safegeom.audit.folder`: the audit folder's manifest, preparation and final table;
- :mod:`~safegeom.audit.result`: :class:`AuditResult` and :func:`load_audit`.
"""

from safegeom.audit.config import FAMILIES, AuditConfig
from safegeom.audit.inputs import AuditInputs, AuditTarget, resolve_inputs
from safegeom.audit.measure import Measured, measure_checkpoint
from safegeom.audit.reference import Reference, build_reference, load_reference
from safegeom.audit.result import AuditResult, load_audit
from safegeom.audit.runner import audit
from safegeom.audit.schema import COLUMNS, METRICS, frame

__all__ = [
    "COLUMNS",
    "FAMILIES",
    "METRICS",
    "AuditConfig",
    "AuditInputs",
    "AuditResult",
    "AuditTarget",
    "Measured",
    "Reference",
    "audit",
    "build_reference",
    "frame",
    "load_audit",
    "load_reference",
    "measure_checkpoint",
    "resolve_inputs",
]
