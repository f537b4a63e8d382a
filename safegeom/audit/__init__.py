"""The checkpoint-trajectory audit: carriers, drift, coupling, causal tests and behaviour.

- :mod:`~safegeom.audit.config`: :class:`AuditConfig`, what is measured;
- :mod:`~safegeom.audit.schema`: the tidy table's columns and metric names;
- :mod:`~safegeom.audit.inputs`: the base and checkpoints (:func:`resolve_inputs`);
- :mod:`~safegeom.audit.runner`: :func:`audit`, resumable;
- :mod:`~safegeom.audit.result`: :class:`AuditResult` and :func:`load_audit`.
"""

from safegeom.audit.config import FAMILIES, AuditConfig
from safegeom.audit.inputs import AuditInputs, AuditTarget, resolve_inputs
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
    "audit",
    "frame",
    "load_audit",
    "resolve_inputs",
]
