"""Trainers over two processes (gloo on CPU) equal one process with the same global batch.

One launch of this module's :func:`worker` as two ranks trains LoRA, SFT, RefusalGuard, KL, LoX and
adaptive runs, LoRA runs stopped part way (one resumed here by one process, others by the same
two, with and without dropout), and two that must fail (a global batch of 3, a planted error on
rank 1); the tests compare them with the same runs in one process here, and run ``safegeom
train`` itself under the launcher.

Tolerance: every weight of every checkpoint within ``ATOL`` = 1e-6 in float32 of the one-process
run (max |Δw| measured: LoRA 7.5e-8 after 3 AdamW steps; after 2: SFT 3.0e-8, RefusalGuard
1.7e-8, KL 1.5e-8, adaptive 9.3e-8, LoX 6.0e-8; a resumed run 7.5e-8: the two ranks' gradient
shares are summed in another order than one process's backward), losses and terms within 1e-5
relative or ``TERM_ATOL`` absolute (a small term, such as a KL of 3.7e-4, is a difference of
log-probabilities whose float32 rounding does not shrink with it: adaptive's KL differed by 6e-9).

``python -m tests.test_train_ddp CHECKPOINT WORK`` is one rank of the job (with ``RANK``,
``WORLD_SIZE`` ... set by :func:`tests.launch_helpers.launch`): it writes ``WORK/rank{r}.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.launch_helpers import launch
from tests.tiny_models import build_checkpoint
from tests.train_parallel_helpers import (
    finish_rank,
    launch_job,
    max_diff,
    outcome,
    record_every_write,
)

pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = 1e-6
"""Largest |Δw| allowed between the two-process and the one-process weights (float32)."""
TASK = "harmful:6"
"""Six examples of different lengths: the two ranks' slices hold different token counts."""
RUN = {"batch_size": 4, "save_every": 1, "lora_dropout": 0.0, "progress": False}
"""Global batch 4 (2 a rank); three steps go round the six examples twice."""
TERM_ATOL = 16 * torch.finfo(torch.float32).eps
"""Absolute tolerance of a loss term (≈1.9e-6): the float32 spacing of log-probabilities of
magnitude up to 16, which two summation orders may differ by however small the term itself is."""
GUARD = {"n_calib": 3, "calib_batch": 2, "penalty_every": 1}
"""RefusalGuard's small calibration (three prompts a class, two every step)."""
RUNS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora", "steps": 3},
    "sft": {"method": "sft", "steps": 2},
    "guard": {"method": "refusalguard", "steps": 2},
    "kl": {"method": "kl", "steps": 2},
    "adaptive": {"method": "adaptive", "steps": 2},
    "lox": {"method": "lox", "steps": 2},
    "cut": {"method": "lora", "steps": 3},
    "cut2": {"method": "lora", "steps": 3},
    "dropout": {"method": "lora", "steps": 2, "lora_dropout": 0.1},
    "dropout_whole": {"method": "lora", "steps": 2, "lora_dropout": 0.1},
    "odd": {"method": "lora", "steps": 1, "batch_size": 3},
    "fail": {"method": "lora", "steps": 2},
}
"""The worker's runs (``RUN`` plus these settings), in order."""
STOP = {"cut": 2, "cut2": 2, "dropout": 1}
"""Runs stopped (on every rank) after this step; the worker resumes ``cut2`` and ``dropout``."""


class LengthCritic:
    """A risk critic for the tests: ``1 + len(prompt) mod 5`` (varied risks in [1, 5])."""

    def risk(self, lm: Any, prompts: Any) -> torch.Tensor:
        """One risk per prompt."""
        return torch.tensor([1.0 + len(p) % 5 for p in prompts])


def _run(ckpt: Path | str, out: Path, name: str, **more: Any) -> Any:
    """Train run ``name`` of :data:`RUNS` into ``out`` (``more`` replaces its settings: the
    ``TrainConfig`` fields go into the config, ``method``, ``callback`` and ``resume`` to train); adaptive
    with :class:`LengthCritic` and §7's per-batch weights (one mean risk over the global batch),
    LoX from the ``unaligned`` checkpoint beside ``ckpt``."""
    from safegeom.training.config import TrainConfig
    from safegeom.training.methods.refusalguard import GuardConfig
    from safegeom.training.posthoc import PosthocConfig
    from safegeom.training.regularised import RegConfig
    from safegeom.training.runner import train

    fields = {**RUN, **RUNS[name], **more}
    keywords = {k: fields.pop(k) for k in ("method", "callback", "resume") if k in fields}
    unaligned = Path(ckpt).parent / "unaligned" / "llama"
    settings = {
        "refusalguard": lambda: GuardConfig(**GUARD),
        "adaptive": lambda: RegConfig(risk_unit="batch", critic=LengthCritic()),
        "lox": lambda: PosthocConfig(unaligned_base=str(unaligned), lox_rank=1, lox_alpha=0.5),
    }.get(keywords["method"], lambda: None)()
    return train(ckpt, TASK, TrainConfig(**fields), out=out, settings=settings, **keywords)


def _plant_failure(on_rank: int, at_step: int) -> None:
    """Make the step loss raise on ``on_rank`` from step ``at_step`` on (the worker's ``fail``)."""
    from safegeom.errors import SafegeomError
    from safegeom.parallel.ranks import rank
    from safegeom.training import step as step_mod

    real = step_mod.StepLoss.__call__

    def failing(self: Any, indices: Any, step: int, **kwargs: Any) -> Any:
        if rank() == on_rank and step >= at_step:
            raise SafegeomError(f"planted failure on rank {on_rank} at step {step}")
        return real(self, indices, step, **kwargs)

    step_mod.StepLoss.__call__ = failing  # type: ignore[method-assign]


class Stopped(Exception):
    """What the ``cut`` run's callback raises to stop the run (as a Ctrl-C would)."""


def _stop_after(last: int) -> Any:
    """A ``train`` callback that stops the run (every rank) once step ``last`` is done."""

    def callback(step: int, loss: float) -> None:
        if step == last:
            raise Stopped(f"stopped after step {step}")

    return callback


def worker(ckpt: str, work: Path) -> None:
    """One rank: every run of :data:`RUNS` into ``work/NAME``; saves ``work/rank{r}.json`` with
    each run's trajectory (or error) and the paths this rank wrote, made or renamed."""
    from safegeom.parallel import ranks as dist

    torch.set_num_threads(1)
    writes: list[str] = []
    record_every_write(writes)
    res: dict[str, Any] = {"world": dist.world_size()}
    for name in RUNS:
        if name == "fail":
            _plant_failure(on_rank=1, at_step=1)
        more = {"callback": _stop_after(STOP[name])} if name in STOP else {}

        def run(name: str = name, more: dict[str, Any] = more) -> Any:
            try:
                return _run(ckpt, work / name, name, **more)
            except Stopped:
                if name not in ("cut2", "dropout"):
                    raise
                return _run(ckpt, work / name, name, resume=True)  # by the same two processes

        res[name] = outcome(run)
    finish_rank(work, res, writes)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict[str, Any]]]:
    """The tiny checkpoint, the two-process job's folder, and each rank's results."""
    root = tmp_path_factory.mktemp("ddp")
    ckpt = build_checkpoint(root, "llama", n_layers=2)
    build_checkpoint(root / "unaligned", "llama", n_layers=2, seed=1)  # LoX's unaligned base
    work = root / "work"
    work.mkdir()
    return ckpt, work, launch_job("tests.test_train_ddp", ckpt, work, root)


@pytest.mark.parametrize("name", ["lora", "sft", "guard", "kl", "adaptive", "lox"])
def test_two_processes_equal_one(job, tmp_path: Path, name: str) -> None:
    """LoRA, SFT, RefusalGuard, KL, adaptive and LoX (its transform at every checkpoint, on rank
    0) over two ranks: the weights of one process within
    ATOL at every checkpoint, the same losses and terms, and one trajectory, rank 1's the same
    as rank 0's."""
    from safegeom.training.trajectory import load_trajectory

    ckpt, work, ranks = job
    assert ranks[0]["world"] == 2
    assert ranks[0][name] == ranks[1][name]  # rank 1 holds rank 0's trajectory
    two = load_trajectory(work / name)
    one = _run(ckpt, tmp_path / name, name)
    assert two.steps == one.steps == tuple(range(RUNS[name]["steps"] + 1))
    assert [c.weight_hash for c in two.checkpoints] == ranks[0][name]["hashes"]
    for a, b in zip(two.paths[1:], one.paths[1:], strict=True):
        assert max_diff(a, b) <= ATOL
    assert two.losses == pytest.approx(one.losses, rel=1e-5)
    for a, b in zip(two.checkpoints, one.checkpoints, strict=True):
        assert a.terms == pytest.approx(b.terms, rel=1e-5, abs=TERM_ATOL)
    if name == "guard":
        assert [c.terms["geom"] > 0 for c in two.checkpoints] == [False, False, True]
        assert (work / name / "defence" / "cones.safetensors").is_file()
    else:
        assert max_diff(two.paths[0], two.paths[-1]) > 100 * ATOL  # training moved the weights


def test_rank_one_writes_nothing(job) -> None:
    """Every file and folder of every run comes from rank 0, with no temp folder left behind."""
    _, work, ranks = job
    assert ranks[1]["writes"] == []
    written = ranks[0]["writes"]
    assert str(work / "lora" / "trajectory.json") in written
    assert any(path.endswith("step-000003") for path in written)
    assert not list(work.glob("*/checkpoints/.*.tmp"))


def test_resume_with_one_process_equals_uninterrupted(job, tmp_path: Path) -> None:
    """A two-process run of 3 steps stopped after step 2, resumed in one process, equals the
    uninterrupted one-process run within ATOL."""
    ckpt, work, ranks = job
    from safegeom.training.trajectory import load_trajectory

    assert ranks[0]["cut"] == ranks[1]["cut"] == {"error": ["Stopped", "stopped after step 2"]}
    assert load_trajectory(work / "cut").steps == (0, 1, 2)
    resumed = _run(ckpt, work / "cut", "cut", resume=True)
    whole = _run(ckpt, tmp_path / "whole", "lora")
    assert resumed.steps == whole.steps == (0, 1, 2, 3) and resumed.complete
    assert max_diff(resumed.paths[-1], whole.paths[-1]) <= ATOL
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-5)


def test_resume_with_the_same_processes_is_exact(job) -> None:
    """Stopped and resumed by two processes: the uninterrupted two-process run bit for bit, with
    dropout too (each rank's masks are drawn from the seed, the step and the rank)."""
    ranks = job[2]
    for name, whole in (("cut2", "lora"), ("dropout", "dropout_whole")):
        assert (
            ranks[0][name] == ranks[1][name] and ranks[0][name]["steps"] == ranks[0][whole]["steps"]
        )
        assert ranks[0][name]["losses"] == ranks[0][whole]["losses"]
        assert ranks[0][name]["hashes"] == ranks[0][whole]["hashes"]


def test_resume_with_another_world_is_refused_with_dropout(job) -> None:
    """Dropout masks depend on the number of processes: resuming with 1 is refused, by name."""
    from safegeom.errors import ConfigError

    ckpt, work, _ = job
    with pytest.raises(ConfigError, match=r"with 1 process\(es\): it was trained with 2 .*dropout"):
        _run(ckpt, work / "dropout", "dropout", steps=3, resume=True)


def test_bad_global_batch_and_a_failing_rank(job) -> None:
    """A global batch of 3 over 2 ranks is refused on each with both numbers; an error on rank 1
    stops rank 0 too, with rank 1's message."""
    _, work, ranks = job
    for res in ranks:
        kind, message = res["odd"]["error"]
        assert kind == "ConfigError"
        assert "batch_size 3 is the global batch" in message and "processes 2" in message
    assert not (work / "odd" / "trajectory.json").exists()
    assert ranks[1]["fail"]["error"] == ["SafegeomError", "planted failure on rank 1 at step 1"]
    kind, message = ranks[0]["fail"]["error"]
    assert kind == "SafegeomError"
    assert message == "rank 1 of 2 failed: planted failure on rank 1 at step 1"


def test_the_command_under_a_launcher_prints_once(job, tmp_path: Path) -> None:
    """``safegeom train lora`` over two ranks: rank 0 alone prints, and the run is the library's
    two-process run bit for bit."""
    ckpt, work, _ = job
    out = tmp_path / "cli"
    args = [
        "train",
        "lora",
        str(ckpt),
        "--task",
        TASK,
        "--out",
        str(out),
        "--steps",
        "3",
        "--save-every",
        "1",
        "--batch-size",
        "4",
        "--lora-dropout",
        "0",
        "--no-progress",
    ]
    (code0, out0, err0), (code1, out1, err1) = launch("safegeom.cli", args, tmp_path)
    assert (code0, code1) == (0, 0), err0[-2000:] + err1[-2000:]
    assert out0.startswith(f"wrote 4 checkpoints to {out} (step 3") and out1 == ""
    assert (
        max_diff(out / "checkpoints" / "step-000003", work / "lora" / "checkpoints" / "step-000003")
        == 0
    )


def test_sharded_engines_are_refused() -> None:
    """DeepSpeed and Megatron-LM would take the model into their engine: refused (FSDP is
    handled by :mod:`safegeom.parallel.fsdp`, which calls this only for the other engines)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from safegeom.errors import ConfigError
    from safegeom.parallel.ddp import refuse_sharded_training

    for kind in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        with pytest.raises(ConfigError, match=f"training under {kind.value} is not yet supported"):
            refuse_sharded_training(SimpleNamespace(distributed_type=kind))  # type: ignore[arg-type]
    refuse_sharded_training(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))  # type: ignore[arg-type]


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
