"""``python -m safegeom.cli``: the same as the ``safegeom`` command."""

from safegeom.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
