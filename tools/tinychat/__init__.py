"""Build the embedded ``tiny-chat`` model: corpus, tokenizer, and deterministic training.

``python -m tools.tinychat.build --out DIR`` rebuilds the shipped model from the bundled
prompt data (train splits only) in about 12 minutes on a CPU. The public names are imported lazily, so
running the ``build`` module as a script does not import it twice.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Example", "TinyChatConfig", "build_corpus", "build_tiny_chat"]

_WHERE = {
    "Example": "tools.tinychat.corpus",
    "build_corpus": "tools.tinychat.corpus",
    "TinyChatConfig": "tools.tinychat.build",
    "build_tiny_chat": "tools.tinychat.build",
}


def __getattr__(name: str) -> Any:
    """Import a public name from its submodule on first access."""
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
