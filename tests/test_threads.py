"""torch thread counts: one per free core by default, the user's own count kept, restored after."""

from __future__ import annotations

import pytest
import torch

import safegeom.threads as threads_mod
from safegeom.audit.config import AuditConfig
from safegeom.errors import ConfigError
from safegeom.threads import choose_threads, free_cores, torch_threads


@pytest.mark.parametrize(
    ("cores", "load", "expected"),
    [(2, 0.0, 2), (2, 0.4, 2), (2, 1.0, 1), (2, 1.6, 1), (2, 9.0, 1), (8, 2.2, 6), (4, -1.0, 4)],
)
def test_free_cores_is_cores_less_load_between_one_and_cores(cores, load, expected) -> None:
    assert free_cores(cores, load) == expected


def test_free_cores_reads_this_machine() -> None:
    assert 1 <= free_cores() <= threads_mod.cores()


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)


def test_a_given_count_wins(no_env, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_threads(3) == threads_mod.ThreadChoice(3, "config")
    with pytest.raises(ConfigError, match=r"threads \(--threads\) must be at least 1, got 0"):
        choose_threads(0)
    with pytest.raises(ConfigError, match=r"threads \(--threads\) must be at least 1, got 0"):
        AuditConfig(threads=0)


def test_the_users_own_count_is_kept(no_env, monkeypatch) -> None:
    monkeypatch.setattr(threads_mod, "free_cores", lambda: 7)
    with torch_threads(threads_mod._AT_IMPORT):
        assert choose_threads() == threads_mod.ThreadChoice(7, "free cores")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert choose_threads().source == "user"
        monkeypatch.delenv("OMP_NUM_THREADS")
    changed = threads_mod._AT_IMPORT + 1  # torch.set_num_threads called after import
    with torch_threads(changed):
        assert choose_threads() == threads_mod.ThreadChoice(changed, "user")


def test_torch_threads_restores_the_count_after_an_error() -> None:
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"), torch_threads(before + 1) as n:
        assert n == torch.get_num_threads() == before + 1
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before
