"""Deprecated: use :mod:`safegeom.artifacts` (``Provenance``, ``sha256_text``)."""

from safegeom.artifacts import sha256_text as text_hash

__all__ = ["text_hash"]
