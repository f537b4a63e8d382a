"""Shared fixtures: seeds, and tiny checkpoints of many architectures."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny_models import ARCHS, build_checkpoint

MAIN_ARCHS = tuple(ARCHS)


@pytest.fixture(autouse=True)
def _seeds() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one intra-op thread: tiny models gain nothing from more, and on a shared
    CPU extra threads only spin. Restores the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Directories of tiny random checkpoints, one per architecture."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: build_checkpoint(root, arch) for arch in ARCHS}
