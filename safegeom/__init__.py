"""safegeom: the safety geometry of language models.

Where refusal and harmfulness are carried inside a chat model, how fine-tuning moves and couples
them, and which internal changes cause the behaviour. See README.md and DESIGN notes in the docs.
"""

from __future__ import annotations

__version__ = "0.1.0"
