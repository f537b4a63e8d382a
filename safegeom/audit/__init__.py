"""The checkpoint-trajectory audit: carriers, drift, coupling, causal tests and behaviour.

- :mod:`~safegeom.audit.config`: :class:`AuditConfig`, what is measured;
- :mod:`~safegeom.audit.schema`: the tidy table's columns and metric names.
"""

from safegeom.audit.config import FAMILIES, AuditConfig
from safegeom.audit.schema import COLUMNS, METRICS, frame

__all__ = ["COLUMNS", "FAMILIES", "METRICS", "AuditConfig", "frame"]
