"""How every subcommand prints a result with ``--json``: :func:`emit_json`.

Options are derived from config dataclasses in :mod:`safegeom.cli.options`; this module only prints.
"""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["emit_json"]


def emit_json(payload: Any) -> None:
    """Print ``payload`` to stdout as indented JSON with sorted keys (anything else as ``str``);
    returns nothing."""
    json.dump(payload, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")
