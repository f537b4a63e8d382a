"""The library's own errors for bad input.

Every error a user can fix (a wrong name, an empty prompt set, a mismatched carrier, a non-finite
score, an unwritable output) is a :class:`SafegeomError`. The command line prints exactly these as
one line and exits with status 2; every other exception is a bug and keeps its traceback.

``SafegeomError`` subclasses :class:`ValueError`, so callers that catch ``ValueError`` keep working.
The subclasses that also mean "not found" subclass :class:`FileNotFoundError` as well.

Example:
    >>> from safegeom.errors import SafegeomError
    >>> try:
    ...     raise SafegeomError("no prompts in 'empty.csv'")
    ... except ValueError as err:
    ...     print(err)
    no prompts in 'empty.csv'
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "ConfigError",
    "ModelLoadError",
    "NonFiniteError",
    "NotFoundError",
    "OutputPathError",
    "SafegeomError",
    "TrainingDiverged",
]


class SafegeomError(ValueError):
    """Bad input the user can fix; the message names the fix."""


class ConfigError(SafegeomError):
    """A configuration value (a flag on the command line) is out of range or malformed."""


class NotFoundError(SafegeomError, FileNotFoundError):
    """A named file, folder, model or prompt set does not exist."""

    def __str__(self) -> str:  # FileNotFoundError would format (errno, strerror) tuples
        return str(self.args[0]) if self.args else ""


class ModelLoadError(SafegeomError):
    """A checkpoint exists but cannot be loaded as a model (corrupt, pickled, wrong kind)."""


class ArtifactError(SafegeomError):
    """A saved result cannot be read back: truncated, not a safegeom file, or mismatched."""


class OutputPathError(SafegeomError):
    """An output location cannot be written; raised before any work starts."""


class NonFiniteError(SafegeomError):
    """NaN or inf where a number was expected (weights, logits, scores, a coefficient)."""


class TrainingDiverged(NonFiniteError):
    """The training loss became non-finite; the message names the step."""
