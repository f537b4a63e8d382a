"""``python -m safegeom.cli``: the same as the ``safegeom`` command."""

from safegeom.cli import main

raise SystemExit(main())
