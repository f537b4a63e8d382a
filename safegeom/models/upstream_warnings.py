"""Two deprecation warnings that dependencies raise on safegeom's behalf, filtered exactly.

peft reads ``model.is_gradient_checkpointing`` whenever it wraps a model (``get_peft_model`` when
training a LoRA, ``PeftModel.from_pretrained`` when loading an adapter), a property transformers
5.2x deprecated with a ``FutureWarning``; a forward handed ``past_key_values`` (by peft or a
checkpoint's own code) warns that the keyword is now ``cache``. safegeom cannot change those
calls, and each warning printed on stderr breaks a progress bar in two. safegeom's own generation
passes the cache under the forward's own keyword, so it triggers neither.

:func:`silence_upstream_deprecations` adds one ignore filter per message, matched on its text
and category ``FutureWarning``, and nothing else; :func:`~safegeom.models.loading.load_model`
applies it (every command and training run loads its model there first).
"""

from __future__ import annotations

import warnings

__all__ = ["MESSAGES", "silence_upstream_deprecations"]

MESSAGES = (
    r"`is_gradient_checkpointing` is deprecated",
    r"`past_key_values` is deprecated .* Use `cache` instead",
)
"""Regular expressions of the filtered messages (matched from the message's start)."""


def silence_upstream_deprecations() -> None:
    """Ignore the :data:`MESSAGES` ``FutureWarning`` s from here on (idempotent: a repeated call
    moves the same filters to the front, so a later ``simplefilter`` does not undo them)."""
    for message in MESSAGES:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
