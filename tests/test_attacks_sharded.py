"""``safegeom attack`` over two CPU ranks (gloo) equals one process: behaviours dealt one per rank
per round, rank 0 writing, ``--resume`` continuing a one-process set whatever the number of
ranks; records compared bit for bit (losses, ids, prompts, verdicts), timings aside."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from safegeom.attacks import AttackSet, load_attack_set
from safegeom.cli import main
from tests.launch_helpers import launch

pytestmark = pytest.mark.usefixtures("one_thread")
"""The one-process reference runs on one thread, as every rank does (``OMP_NUM_THREADS=1``)."""

GCG = ["--n-tokens", "4", "--steps", "2", "--search-width", "24", "--top-k", "8"]


def _args(out: Path, limit: int, *extra: str) -> list[str]:
    return [
        "attack",
        "tiny-chat",
        "--prompts",
        "advbench:val",
        "--limit",
        str(limit),
        "--max-new-tokens",
        "8",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
        *GCG,
        *extra,
    ]


def _timeless(attacks: AttackSet) -> list[object]:
    return [dataclasses.replace(r, seconds=0.0) for r in attacks.records]


def test_two_ranks_equal_one_and_resume_across_them(tmp_path: Path) -> None:
    assert main(_args(tmp_path / "one", 4)) == 0
    reference = load_attack_set(tmp_path / "one")
    assert main(_args(tmp_path / "two", 1)) == 0  # one process attacks the first behaviour
    runs = launch("safegeom.cli", _args(tmp_path / "two", 4, "--resume"), tmp_path)
    for rank, (code, _, err) in enumerate(runs):
        assert code == 0, f"rank {rank}: {err[-2000:]}"
    assert "4 behaviours" in runs[0][1] and runs[1][1] == ""  # rank 0 alone prints
    sharded = load_attack_set(tmp_path / "two")
    assert len(sharded) == 4  # behaviours 1, 2 in one round, 3 alone in the next
    assert _timeless(sharded) == _timeless(reference)
    assert sharded.success_rate == reference.success_rate
