"""Settings of the docstring examples pytest collects from the package (``--doctest-modules``).

The fixtures of ``tests/conftest.py`` apply to ``tests/`` only; this file gives the doctests the
same footing: one intra-op thread (tiny-chat gains nothing from more, and on a shared CPU extra
threads only spin) and fixed seeds, both restored or reset around each example.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

PACKAGE = Path(__file__).resolve().parent / "safegeom"


@pytest.fixture(autouse=True)
def _doctest_footing(request: pytest.FixtureRequest) -> Iterator[None]:
    """For an item collected from the package (a doctest): one thread and seeds 0 while it runs;
    the items of ``tests/`` are left alone."""
    if not Path(request.node.path).resolve().is_relative_to(PACKAGE):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    try:
        yield
    finally:
        torch.set_num_threads(before)
