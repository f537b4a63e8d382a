"""Full-parameter training with FSDP (``fsdp=True``) over two processes (gloo on CPU) equals one
process with the same global batch, and its checkpoints are those of one process.

One launch of this module's :func:`worker` as two ranks trains a tiny random Llama with ``sft``
and ``fsdp=True`` (every weight sharded per decoder block), two such runs stopped after step 1
(one resumed here by the same two ranks, the other here by one process without FSDP), a LoRA
run with ``fsdp=True`` that must be refused, and an sft run of a twin whose output head is its
input embedding (tied).

Tolerance: every weight of every checkpoint within ``ATOL`` = 1e-6 in float32 of the one-process
run without FSDP (max |Δw| measured after 2 AdamW steps: 3.0e-8; the AdamW moments saved within
3.1e-9: the gradient shares are summed in another order than one process's backward), losses
within 1e-5 relative; the step-0 checkpoint (gathered from the shards) is the base bit for bit.

``python -m tests.test_train_fsdp CHECKPOINT WORK`` is one rank of the job (with ``RANK``,
``WORLD_SIZE`` ... set by :func:`tests.launch_helpers.launch`): it writes ``WORK/rank{r}.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.tiny_models import build_checkpoint
from tests.train_helpers import saved_weights
from tests.train_parallel_helpers import (
    finish_rank,
    launch_job,
    max_diff,
    outcome,
    record_every_write,
)

pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = 1e-6
"""Largest |Δw| allowed between the two-process FSDP and the one-process weights (float32)."""
TASK = "harmful:6"
"""Six examples of different lengths: the two ranks' slices hold different token counts."""
RUN = {"method": "sft", "steps": 2, "batch_size": 4, "save_every": 1, "progress": False}
"""Global batch 4 (2 a rank), two steps, a checkpoint at every step."""
RUNS: dict[str, dict[str, Any]] = {
    "sft": {"fsdp": True},
    "cut": {"fsdp": True},
    "cut1": {"fsdp": True},
    "noclip": {"fsdp": True, "steps": 1, "grad_clip": None},
    "lora": {"fsdp": True, "method": "lora"},
    "tied": {"fsdp": True},
}
"""The worker's runs (``RUN`` plus these settings), in order; ``cut`` and ``cut1`` are stopped
after step 1, ``cut`` resumed at once by the same two ranks; ``noclip`` leaves the gradients'
scale in the AdamW moments (a clip to norm 1 would hide a mean in place of the sum); ``tied``
trains the model whose output head is its input embedding (:func:`_tied`)."""
LORA_REFUSED = "FSDP shards full weights and is for sft only; lora trains small adapters"


class Stopped(Exception):
    """What the ``cut`` runs' callback raises to stop the run (as a Ctrl-C would)."""


def _stop_after_one(step: int, loss: float) -> None:
    """A ``train`` callback that stops the run once step 1 is done."""
    if step == 1:
        raise Stopped(f"stopped after step {step}")


def _run(ckpt: Path | str, out: Path, name: str, **more: Any) -> Any:
    """Train run ``name`` of :data:`RUNS` into ``out`` (``more`` replaces its settings): the
    ``TrainConfig`` fields go into the config, ``method``, ``callback`` and ``resume`` to train."""
    from safegeom.training import TrainConfig, train

    settings = {**RUN, **RUNS[name], **more}
    keywords = {k: settings.pop(k) for k in ("method", "callback", "resume") if k in settings}
    return train(ckpt, TASK, TrainConfig(**settings), out=out, **keywords)


def _tied(ckpt: Path | str) -> Path:
    """The tied-embedding twin of the job's checkpoint (built by the fixture beside it)."""
    return Path(ckpt).parent / "tied" / "llama"


def worker(ckpt: str, work: Path) -> None:
    """One rank: every run of :data:`RUNS` into ``work/NAME``; saves ``work/rank{r}.json`` with
    each run's trajectory (or error) and the paths this rank wrote, made or renamed."""
    from safegeom.parallel import ranks as dist

    torch.set_num_threads(1)
    writes: list[str] = []
    record_every_write(writes)
    res: dict[str, Any] = {"world": dist.world_size()}
    for name in RUNS:
        more = {"callback": _stop_after_one} if name.startswith("cut") else {}

        def run(name: str = name, more: dict[str, Any] = more) -> Any:
            source = _tied(ckpt) if name == "tied" else ckpt
            try:
                return _run(source, work / name, name, **more)
            except Stopped:
                if name != "cut":
                    raise
                return _run(ckpt, work / name, name, resume=True)  # by the same two processes

        res[name] = outcome(run)
    finish_rank(work, res, writes)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict[str, Any]]]:
    """The tiny checkpoint, the two-process job's folder, and each rank's results."""
    root = tmp_path_factory.mktemp("fsdp")
    ckpt = build_checkpoint(root, "llama", n_layers=2)
    build_checkpoint(root / "tied", "llama", n_layers=2, tied=True)
    work = root / "work"
    work.mkdir()
    return ckpt, work, launch_job("tests.test_train_fsdp", ckpt, work, root)


@pytest.fixture(scope="module")
def one(job, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The same sft run in one process, without FSDP."""
    return _run(job[0], tmp_path_factory.mktemp("one") / "sft", "sft", fsdp=False)


def test_two_fsdp_processes_equal_one(job, one) -> None:
    """Two ranks with sharded weights: one trajectory (rank 1 holds rank 0's), the one-process
    weights within ATOL at every checkpoint (the base bit for bit at step 0), the same losses."""
    from safegeom.training.trajectory import load_trajectory

    _, work, ranks = job
    assert ranks[0]["world"] == 2
    assert ranks[0]["sft"] == ranks[1]["sft"]
    two = load_trajectory(work / "sft")
    assert two.steps == one.steps == (0, 1, 2)
    assert [c.weight_hash for c in two.checkpoints] == ranks[0]["sft"]["hashes"]
    assert two.checkpoints[0].weight_hash == one.checkpoints[0].weight_hash
    for a, b in zip(two.paths, one.paths, strict=True):
        assert max_diff(a, b) <= ATOL
    assert two.losses == pytest.approx(one.losses, rel=1e-5)
    assert max_diff(two.paths[0], two.paths[-1]) > 100 * ATOL  # training moved the weights


def test_tied_embeddings_stay_tied(job, tmp_path: Path) -> None:
    """A model whose output head is its input embedding (one parameter, sharded once with the
    rest of the model): two FSDP ranks equal one process within ATOL, and every checkpoint
    loads back with the head still the embedding."""
    from safegeom.models import load_model
    from safegeom.training.trajectory import load_trajectory

    ckpt, work, ranks = job
    assert ranks[0]["tied"] == ranks[1]["tied"]
    one = _run(_tied(ckpt), tmp_path / "tied", "tied", fsdp=False)
    two = load_trajectory(work / "tied")
    assert two.steps == one.steps == (0, 1, 2)
    for a, b in zip(two.paths, one.paths, strict=True):
        assert max_diff(a, b) <= ATOL
    assert max_diff(two.paths[0], two.paths[-1]) > 100 * ATOL  # training moved the weights
    assert two.losses == pytest.approx(one.losses, rel=1e-5)
    model = load_model(two.paths[-1]).base
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.data_ptr() == embedding.data_ptr()


def test_checkpoints_hold_full_tensors(job, one) -> None:
    """An FSDP checkpoint holds every weight whole (the base's names and shapes), loads with
    ``load_model`` to its recorded hash, and its AdamW moments are whole, numbered as one
    process numbers them."""
    from safetensors.torch import load_file

    from safegeom.models import load_model
    from safegeom.training.trajectory import load_trajectory

    ckpt, work, _ = job
    two = load_trajectory(work / "sft")
    base, last = saved_weights(ckpt), saved_weights(two.paths[-1])
    assert {k: v.shape for k, v in last.items()} == {k: v.shape for k, v in base.items()}
    assert load_model(two.paths[-1]).weight_hash == two.checkpoints[-1].weight_hash
    config = json.loads((two.paths[-1] / "config.json").read_text())
    assert config == json.loads((one.paths[-1] / "config.json").read_text())
    state = two.paths[-1] / "trainer_state"
    moments, mine = (
        load_file(str(state / "state.safetensors")),
        load_file(str(one.paths[-1] / "trainer_state" / "state.safetensors")),
    )
    assert moments.keys() == mine.keys()
    for key in (k for k in moments if k.startswith("optimizer.")):
        assert moments[key].shape == mine[key].shape
        assert float((moments[key].float() - mine[key].float()).abs().max()) <= ATOL
    assert json.loads((state / "state.json").read_text())["num_processes"] == 2


def test_gradients_are_summed_over_the_ranks(job, tmp_path: Path) -> None:
    """Without a clip the first AdamW moments are the gradient's scale: the two-process ones
    equal one process's within ATOL (a mean over the ranks would halve them)."""
    from safetensors.torch import load_file

    from safegeom.training.trajectory import load_trajectory

    ckpt, work, _ = job
    one = _run(ckpt, tmp_path / "noclip", "noclip", fsdp=False)
    two = load_trajectory(work / "noclip")
    name = "trainer_state/state.safetensors"
    a, b = load_file(str(two.paths[-1] / name)), load_file(str(one.paths[-1] / name))
    moments = [k for k in a if k.endswith(".exp_avg")]
    assert moments and a.keys() == b.keys()
    assert max(float(b[k].abs().max()) for k in moments) > 1000 * ATOL
    assert max(float((a[k] - b[k]).abs().max()) for k in moments) <= ATOL


def test_rank_one_writes_nothing(job) -> None:
    """Every file and folder of every run comes from rank 0, with no temp folder left behind."""
    _, work, ranks = job
    assert ranks[1]["writes"] == []
    assert str(work / "sft" / "trajectory.json") in ranks[0]["writes"]
    assert not list(work.glob("*/checkpoints/.*.tmp"))


def test_resume_from_fsdp_checkpoints(job, one) -> None:
    """Stopped after step 1: resumed by the same two FSDP ranks, the uninterrupted FSDP run bit
    for bit; resumed by one process without FSDP (the moments re-read whole), the one-process
    run within ATOL."""
    ckpt, work, ranks = job
    assert ranks[0]["cut"] == ranks[1]["cut"]
    assert ranks[0]["cut"]["losses"] == ranks[0]["sft"]["losses"]
    assert ranks[0]["cut"]["hashes"] == ranks[0]["sft"]["hashes"]
    assert ranks[0]["cut1"] == {"error": ["Stopped", "stopped after step 1"]}
    resumed = _run(ckpt, work / "cut1", "cut1", fsdp=False, resume=True)
    assert resumed.steps == one.steps and resumed.complete
    assert max_diff(resumed.paths[-1], one.paths[-1]) <= ATOL
    assert resumed.losses == pytest.approx(one.losses, rel=1e-5)


def test_fsdp_is_refused_for_lora(
    job, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """LoRA with FSDP is refused, by name, on both ranks, in one process by ``safegeom train
    lora --fsdp``, and under an accelerate FSDP launch; sft there shards, unless the config
    loads the weights on rank 0 only (refused, by the setting's name)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from safegeom.cli import main
    from safegeom.errors import ConfigError
    from safegeom.parallel.fsdp import use_fsdp

    ckpt, work, ranks = job
    for res in ranks:
        kind, message = res["lora"]["error"]
        assert kind == "ConfigError" and message.startswith(f"--fsdp: {LORA_REFUSED}")
    assert not (work / "lora" / "trajectory.json").exists()
    args = ["train", "lora", str(ckpt), "--task", TASK, "--out", str(tmp_path / "o"), "--fsdp"]
    assert main(args) == 2
    assert f"--fsdp: {LORA_REFUSED}" in capsys.readouterr().err
    launched = SimpleNamespace(distributed_type=DistributedType.FSDP)
    with pytest.raises(ConfigError, match=f"an accelerate FSDP config: {LORA_REFUSED}"):
        use_fsdp(launched, False, "lora", "lora")  # type: ignore[arg-type]
    assert use_fsdp(launched, False, "full", "sft") is True  # type: ignore[arg-type]
    plain = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    assert use_fsdp(plain, False, "full", "sft") is False  # type: ignore[arg-type]
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with pytest.raises(ConfigError, match="set fsdp_cpu_ram_efficient_loading: false"):
        use_fsdp(launched, False, "full", "sft")  # type: ignore[arg-type]


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
