"""Two CPU processes over gloo give what one process gives; rank 0 alone writes; failures stop all.

The two ranks run ``tests/distributed_worker.py`` with the environment a launcher sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, a free ``MASTER_PORT``); the same calls in this
(single) process are the reference.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from safegeom.activations import CaptureConfig, capture, capture_stats, capture_to_disk
from safegeom.activations.values import load_activations
from safegeom.errors import SafegeomError
from safegeom.evaluation import EvaluateConfig, evaluate, refusal_scores
from safegeom.models import LoadConfig, load_model
from safegeom.models.chat import encode_set
from safegeom.parallel import ranks as dist
from safegeom.parallel.process_group import TIMEOUT_ENV, timeout
from tests.distributed_worker import CAPTURE, PROMPTS, load_results
from tests.launch_helpers import ROOT, TIMEOUT_S, free_port
from tests.launch_helpers import launch as run_ranks
from tests.tiny_models import build_checkpoint


def _launch(args: list[str], logs: Path, world: int = 2) -> list[tuple[int, str]]:
    """Run ``tests.distributed_worker ARGS`` as ``world`` ranks; ``(exit status, output)`` each."""
    return [
        (code, out + err)
        for code, out, err in run_ranks("tests.distributed_worker", args, logs, world)
    ]


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The two ranks' results, the library's output folder and the checkpoint."""
    root = tmp_path_factory.mktemp("distributed")
    checkpoint = build_checkpoint(root, "llama")
    out, work = root / "out", root / "work"
    out.mkdir()
    work.mkdir()
    runs = _launch([str(checkpoint), str(out), str(work)], logs=root)
    for r, (code, output) in enumerate(runs):
        assert code == 0, f"rank {r} failed:\n{output[-4000:]}"
    ranks = [load_results(work / f"rank{r}") for r in range(2)]
    return {"ranks": ranks, "out": out, "checkpoint": checkpoint, "root": root}


@pytest.fixture(scope="module")
def lm(job: dict[str, Any]) -> Any:
    torch.set_num_threads(1)
    return load_model(str(job["checkpoint"]), LoadConfig(device="cpu"))


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for site in a:
        assert a[site].dtype == b[site].dtype and a[site].shape == b[site].shape
        assert torch.equal(a[site], b[site]), site


def test_ranks_and_gather(job: dict[str, Any]) -> None:
    zero, one = job["ranks"]
    assert (zero["rank"], zero["world"], zero["main"]) == (0, 2, True)
    assert (one["rank"], one["world"], one["main"]) == (1, 2, False)
    assert zero["device"] == one["device"] == "cpu"
    assert zero["shard"] == [0, 2, 4, 6] and one["shard"] == [1, 3, 5]
    assert zero["deal"] == [[0, 1], [3, 4]] and one["deal"] == [[2], [5]]
    expected = [f"item{i}" for i in range(7)]
    assert zero["gather_all"] == expected and one["gather_all"] == expected
    assert torch.equal(zero["gather_main"], torch.arange(5) * 10) and one["gather_main"] is None
    for rank in (zero, one):
        assert rank["gather_bad"][0] == "SafegeomError"
        assert "should cover 0..1 once each" in rank["gather_bad"][1]


def test_dealt_encoding_equals_one_process(job: dict[str, Any], lm: Any) -> None:
    """Each rank tokenizes its round-robin share (5 of the 10 prompts), every rank gets all."""
    whole = encode_set(lm.tokenizer, PROMPTS, chat_template=lm.chat_template)
    expected = [[list(e.input_ids), e.t_inst, e.inst_start] for e in whole.encoded]
    shortest = min(len(e) for e in whole.encoded)
    longest = max(range(len(PROMPTS)), key=lambda i: len(whole.encoded[i]))
    for rank, share in zip(job["ranks"], (5, 5), strict=True):
        assert rank["encoded"] == expected
        assert rank["encoded_meta"] == [PROMPTS, whole.template_hash]
        assert rank["encoded_counted"] == [share]  # its share only, once
        assert rank["capture_counted"] == [share]  # capture tokenizes each prompt once per job
        assert rank["encoded_one"] == [expected[0][0]]  # rank 1 has no prompt of a set of one
        # the index of the too-long prompt is the set's, not the rank's share's
        assert rank["too_long"] == [
            "SafegeomError",
            (
                f"prompt {longest} is {len(whole.encoded[longest])} tokens long but the model takes "
                f"at most {shortest} positions; shorten or drop it"
            ),
        ]
        assert rank["empty"] == ["SafegeomError", "empty prompt set: pass at least one prompt"]


def test_sharded_capture_equals_one_process(job: dict[str, Any], lm: Any) -> None:
    reference = capture(lm, PROMPTS, CaptureConfig(batch_size=3, **CAPTURE), progress=False).data
    auto = capture(
        lm, PROMPTS, CaptureConfig(layers="1", **CAPTURE), progress=False
    ).data  # one batch: rank 1 has none
    lens = capture(
        lm,
        PROMPTS,
        CaptureConfig(batch_size=4, backend="transformer_lens", **CAPTURE),
        progress=False,
    ).data
    for rank in job["ranks"]:  # every rank holds all activations, in input order
        _equal(rank["acts"], reference)
        _equal(rank["acts_auto"], auto)
        _equal(rank["acts_lens"], lens)


def test_sharded_stats_equal_one_process(job: dict[str, Any], lm: Any) -> None:
    reference = capture_stats(
        lm,
        PROMPTS,
        CaptureConfig(batch_size=3, stats=True, covariance=True, **CAPTURE),
        progress=False,
    )
    for rank in job["ranks"]:
        assert rank["n_forward"] == reference.n_forward == 4
        for site, (n, mean, cov) in rank["stats"].items():
            moments = reference.moments[site]
            assert n == moments.n == len(PROMPTS)
            # the Chan merge over ranks regroups float64 sums: equal to rounding
            torch.testing.assert_close(mean, moments.mean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(cov, moments.cov, rtol=1e-10, atol=1e-12)


def test_sharded_disk_equals_one_process(job: dict[str, Any], lm: Any, tmp_path: Path) -> None:
    path = capture_to_disk(
        lm,
        PROMPTS,
        tmp_path / "one",
        CaptureConfig(batch_size=3, shard_size=4, **CAPTURE),
        progress=False,
    )
    reference = load_activations(path).data
    names = sorted(p.name for p in path.iterdir())
    for rank in job["ranks"]:
        _equal(rank["disk"], reference)
        assert rank["disk_shards"] == names  # the same shards as one process
    shards = [name for name in names if name.startswith("shard-")]
    assert len(shards) == 2  # 6 prompts (two batches of 3), then 4
    for name in shards:  # byte for byte: tensors and prompt indices alike
        assert (job["out"] / "disk" / name).read_bytes() == (path / name).read_bytes()


def test_sharded_evaluate_equals_one_process(job: dict[str, Any], lm: Any) -> None:
    result = evaluate(
        lm, PROMPTS, EvaluateConfig(max_new_tokens=4, batch_size=3, n_resamples=50), progress=False
    )
    scores = refusal_scores(lm, PROMPTS, batch_size=2, progress=False)
    for rank in job["ranks"]:
        assert rank["eval"] == [list(result.completions), list(result.scores), list(result.refused)]
        assert rank["eval_metrics"] == {k: m.value for k, m in result.metrics.items()}
        assert torch.equal(rank["scores"], scores)


def test_rank_zero_alone_writes(job: dict[str, Any]) -> None:
    zero, one = job["ranks"]
    assert one["writes"] == [] and one["main_only"] is None
    written = sorted(Path(p).relative_to(job["out"]).as_posix() for p in zero["writes"])
    assert written == [*(f"disk/{name}" for name in zero["disk_shards"]), "main.txt"]
    assert zero["disk_shards"] == [
        "activations.json",
        *(f"shard-0000{i}.safetensors" for i in (0, 1)),
    ]
    assert zero["main_only"] == str(job["out"] / "main.txt")
    assert (job["out"] / "main.txt").read_text() == "written once"
    assert not (job["out"] / "partial" / "activations.json").exists()  # the failed run's index


def test_failure_on_one_rank_stops_both(job: dict[str, Any]) -> None:
    zero, one = job["ranks"]
    planted = "planted failure on rank 1"
    # the failing rank raises its own error; the other names the failing rank and its message
    for key in ("fail_capture", "fail_disk"):  # in one step, and in a round of the disk loop
        assert one[key] == ["SafegeomError", planted]
        assert zero[key] == ["SafegeomError", f"rank 1 of 2 failed: {planted}"]
    assert zero["fail_eval"] == ["RuntimeError", "a bug on rank 0"]  # a bug keeps its type
    assert one["fail_eval"] == [
        "SafegeomError",
        "rank 0 of 2 failed: RuntimeError: a bug on rank 0",
    ]
    bad_out = f"--out {job['out'] / 'a_file'} is a file; give a folder"  # checked by rank 0 only
    assert zero["fail_write"] == ["OutputPathError", bad_out]
    assert one["fail_write"] == ["SafegeomError", f"rank 0 of 2 failed: {bad_out}"]


def test_cli_under_accelerate_launch(job: dict[str, Any], lm: Any) -> None:
    """``accelerate launch --num_processes 2 -m safegeom.cli capture``: one file, one line."""
    prompts, out = job["root"] / "prompts.jsonl", job["root"] / "cli" / "acts.safetensors"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    command = [
        "-m",
        "safegeom.cli",
        "capture",
        str(job["checkpoint"]),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--batch-size",
        "3",
        "--layers",
        "1-2",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        [*launch, *command],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        stdout, _ = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stdout[-4000:]
    assert stdout.count(f"wrote {out}") == 1  # rank 0 alone prints (and writes)
    saved = load_activations(out)
    reference = capture(lm, PROMPTS, CaptureConfig(batch_size=3, layers="1-2"), progress=False)
    _equal(saved.data, reference.data)


def test_one_process_needs_no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    values = ["a", "b", "c"]
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    assert dist.device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert dist.shard(3) == range(3) and dist.deal([[1], [0, 2]]) == [[1], [0, 2]]
    assert dist.gather(values, range(3), 3) is values  # the identity
    assert dist.gather(["y", "x"], [1, 0], 2) == ["x", "y"]
    assert dist.collect(5) == [5] and dist.all_or_none(lambda x: x + 1, 1) == 2
    assert dist.main_only(lambda: "wrote")() == "wrote"
    with pytest.raises(ValueError, match="boom"):
        dist.all_or_none(lambda: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(ValueError, match="cannot shard a negative number of items"):
        dist.shard(-1)
    with pytest.raises(ValueError, match="gather: 1 values for 2 indices"):
        dist.gather([1], [0, 1], 2)
    assert not torch.distributed.is_initialized()


def test_broadcast_and_alone_over_two_ranks(tmp_path: Path) -> None:
    runs = run_ranks("tests.distributed_worker", ["helpers", str(tmp_path)], tmp_path)
    for r, (code, out, err) in enumerate(runs):
        assert code == 0, f"rank {r} failed:\n{(out + err)[-4000:]}"
    zero, one = (load_results(tmp_path / f"helpers-rank{r}") for r in range(2))
    for res in (zero, one):  # rank 0's value on every rank, tensors included
        assert res["broadcast"]["from"] == 0
        assert torch.equal(res["broadcast"]["tensor"], torch.tensor([0, 10]))
        assert res["broadcast_none"] is None
        # alone: each rank is a job of one process, nested or not, and waits for no other
        assert res["nested"] == [0, 1]
        assert res["alone"] == [0, 1, True, [0, 1, 2]]
        assert res["alone_deal"] == [[0, 1], [2]] and res["alone_gather"] == ["x", "y"]
        assert res["after"] == [res["rank"], 2, [0, 1]]  # a job of two again afterwards
    assert zero["alone_collect"] == ["from 0"] and one["alone_collect"] == ["from 1"]
    assert zero["alone_broadcast"] == "own 0" and one["alone_broadcast"] == "own 1"
    assert zero["alone_fail"] is None  # rank 1's failure stayed on rank 1
    assert one["alone_fail"] == ["SafegeomError", "failed alone on rank 1"]
    # no close() in that script: the library's exit handler tore the group down before exit
    for r in range(2):
        assert json.loads((tmp_path / f"exit-rank{r}.json").read_text()) is False


def test_a_late_rank_fails_the_wait_after_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1 comes 8 s late under a 3 s timeout: rank 0 stops waiting and says why."""
    monkeypatch.setenv(TIMEOUT_ENV, "3")
    runs = run_ranks("tests.distributed_worker", ["late", str(tmp_path)], tmp_path)
    for r, (code, out, err) in enumerate(runs):
        assert code == 0, f"rank {r} failed:\n{(out + err)[-4000:]}"
    zero, one = (json.loads((tmp_path / f"late-rank{r}.json").read_text()) for r in range(2))
    assert zero["failure"][0] == "SafegeomError"
    assert zero["failure"][1].startswith(
        "rank 0 waited longer than 3 s for the other ranks in a collective "
        "(set SAFEGEOM_DIST_TIMEOUT_S to wait longer): Timed out waiting 3000ms"
    )
    assert zero["waited"] >= 2.5  # it waited out the timeout, and failed before rank 1 came
    # rank 1 comes to a job whose other rank has gone (or stopped waiting): it fails too, and says so
    assert one["failure"][0] == "SafegeomError" and one["failure"][1].startswith("rank 1")


@pytest.mark.parametrize("text", ["abc", "0", "-5", "inf", "nan"])
def test_a_bad_timeout_is_refused(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv(TIMEOUT_ENV, text)
    with pytest.raises(
        SafegeomError,
        match=rf"^SAFEGEOM_DIST_TIMEOUT_S='{text}': expected a "
        r"number of seconds > 0$",
    ):
        timeout()


def test_the_timeout_is_read_in_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert timeout() is None  # PyTorch's default
    monkeypatch.setenv(TIMEOUT_ENV, " 5400 ")
    assert timeout() == timedelta(minutes=90)


def test_broadcast_and_alone_in_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    value = {"a": [1, 2]}
    assert dist.broadcast(value) is value  # the identity
    with dist.alone():
        assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
        assert dist.broadcast(value) is value and dist.collect(3) == [3]
    with pytest.raises(ValueError, match="raised inside"), dist.alone():
        raise ValueError("raised inside")
    assert dist._ALONE == [0]  # left even when the block raises
    assert not torch.distributed.is_initialized()
