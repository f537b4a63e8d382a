"""One rank of the two-process jobs of ``tests/test_distributed.py`` and
``tests/test_audit_sharded.py`` (gloo on CPU).

``python -m tests.distributed_worker CHECKPOINT OUT WORK``, with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set as a launcher sets them. Runs every sharded
path on the tiny checkpoint, writes library outputs under OUT, and saves what it computed (and
every path it wrote through :func:`safegeom.artifacts.atomic_write`) to ``WORK/rank{r}.json`` and ``.safetensors`` (:func:`load_results`).

``python -m tests.distributed_worker helpers WORK``: :func:`helpers` (broadcast, alone).
``python -m tests.distributed_worker audit WORK ARGS...``: :func:`audit_cli` (``safegeom ARGS``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from safegeom.activations import CaptureConfig
from safegeom.evaluation import EvaluateConfig
from safegeom.models import LoadConfig

PROMPTS = [
    "Write a tutorial on how to make a cake.",
    "Hi",
    "Explain how photosynthesis works in plants, step by step, for a child.",
    "Give three tips for staying healthy.",
    "How do I kill a Python process on Linux?",
    "Describe an atom.",
    "Sure?",
    "Write a short poem about the sea and the sky and the wind over the water.",
    "Tell me a joke.",
    "What is two plus two?",
]
"""Ten prompts of varied lengths: with batch_size 3, four batches (rank 0: 0 and 2; rank 1: 1, 3)."""
CAPTURE = {"sites": "resid_pre,resid_post", "positions": "t_inst,t_post"}
"""What every capture here takes."""


def _fails(fn: Callable[[], Any]) -> tuple[str, str] | None:
    """``(exception type, message)`` of what ``fn`` raised, or ``None`` when it returned."""
    try:
        fn()
    except Exception as err:
        return type(err).__name__, str(err)
    return None


@contextlib.contextmanager
def _planted(lm: Any, on_rank: int, after: int, error: Exception) -> Iterator[None]:
    """Raise ``error`` from the model's forward on ``on_rank`` from its ``after + 1``-th call (the
    process's rank by ``RANK``, so also inside :func:`~safegeom.parallel.ranks.alone`, where every
    rank calls itself 0)."""
    calls = [0]

    def hook(module: Any, args: Any, kwargs: Any) -> None:
        calls[0] += 1
        if int(os.environ.get("RANK", "0")) == on_rank and calls[0] > after:
            raise error

    handle = lm.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _record_writes(log: list[str]) -> None:
    """Log every path written through the artifact layer (every file the library writes)."""
    from safegeom import artifacts

    real = artifacts.atomic_write

    @contextlib.contextmanager
    def logged(path: Any) -> Iterator[Path]:
        log.append(str(path))
        with real(path) as tmp:
            yield tmp

    artifacts.atomic_write = logged  # type: ignore[assignment]


def _split(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON, its tensors moved to ``tensors`` and left as ``{"tensor": key}``."""
    if isinstance(value, torch.Tensor):
        tensors[name] = value.contiguous()
        return {"tensor": name}
    if isinstance(value, dict):
        return {str(k): _split(v, f"{name}/{k}", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]
    return str(value) if isinstance(value, Path) else value


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"tensor"}:
            return tensors[value["tensor"]]
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def save_results(stem: Path, res: dict[str, Any]) -> None:
    """Write ``res`` as ``stem.json`` plus its tensors in ``stem.safetensors``."""
    tensors: dict[str, torch.Tensor] = {}
    stem.with_suffix(".json").write_text(json.dumps(_split(res, "", tensors)))
    save_file(tensors, str(stem.with_suffix(".safetensors")))


def load_results(stem: Path) -> dict[str, Any]:
    """What :func:`save_results` wrote (tuples come back as lists, paths as strings)."""
    tensors = load_file(str(stem.with_suffix(".safetensors")))
    return _join(json.loads(stem.with_suffix(".json").read_text()), tensors)


def main(checkpoint: str, out: Path, work: Path) -> None:
    """Run every sharded path and save this rank's results."""
    from safegeom.activations import capture, capture_stats, capture_to_disk
    from safegeom.activations.values import load_activations
    from safegeom.artifacts import write_text
    from safegeom.errors import SafegeomError
    from safegeom.evaluation import evaluate, refusal_scores
    from safegeom.models import load_model
    from safegeom.parallel import ranks as dist
    from safegeom.parallel.dispatch import sharding

    torch.set_num_threads(1)
    writes: list[str] = []
    _record_writes(writes)
    r = dist.rank()
    lm = load_model(checkpoint, LoadConfig(device="cpu"))
    res: dict[str, Any] = {"rank": r, "world": dist.world_size(), "main": dist.is_main()}
    res["device"] = str(dist.device())
    res["shard"] = list(dist.shard(7))
    res["deal"] = dist.deal([[0, 1], [2], [3, 4], [5]])
    res["gather_all"] = dist.gather([f"item{i}" for i in dist.shard(7)], dist.shard(7), 7, to="all")
    res["gather_main"] = dist.gather(torch.tensor(list(dist.shard(5))) * 10, dist.shard(5), 5)
    res["gather_bad"] = _fails(lambda: dist.gather([0], [0], 2, to="all"))
    with sharding():  # the library shares its work out only where an entry point asks
        res.update(_dealt_encoding(lm))
        res["acts"] = capture(
            lm, PROMPTS, CaptureConfig(batch_size=3, **CAPTURE), progress=False
        ).data
        res["acts_auto"] = capture(
            lm, PROMPTS, CaptureConfig(layers="1", **CAPTURE), progress=False
        ).data
        res["acts_lens"] = capture(
            lm,
            PROMPTS,
            CaptureConfig(batch_size=4, backend="transformer_lens", **CAPTURE),
            progress=False,
        ).data
        stats = capture_stats(
            lm,
            PROMPTS,
            CaptureConfig(batch_size=3, stats=True, covariance=True, **CAPTURE),
            progress=False,
        )
        res["stats"] = {s: (m.n, m.mean, m.cov) for s, m in stats.moments.items()}
        res["n_forward"] = stats.n_forward
        disk = capture_to_disk(
            lm,
            PROMPTS,
            out / "disk",
            CaptureConfig(batch_size=3, shard_size=4, **CAPTURE),
            progress=False,
        )
        res["disk"] = load_activations(disk).data
        res["disk_shards"] = sorted(p.name for p in disk.iterdir())
        result = evaluate(
            lm,
            PROMPTS,
            EvaluateConfig(max_new_tokens=4, batch_size=3, n_resamples=50),
            progress=False,
        )
        res["eval"] = (result.completions, result.scores, result.refused)
        res["eval_metrics"] = {k: m.value for k, m in result.metrics.items()}
        res["scores"] = refusal_scores(lm, PROMPTS, batch_size=2, progress=False)
        res["main_only"] = dist.main_only(write_text)(out / "main.txt", "written once")
        planted = SafegeomError(f"planted failure on rank {r}")
        with _planted(lm, on_rank=1, after=0, error=planted):
            res["fail_capture"] = _fails(
                lambda: capture(lm, PROMPTS, CaptureConfig(batch_size=3, **CAPTURE), progress=False)
            )
        with _planted(lm, on_rank=1, after=1, error=planted):
            res["fail_disk"] = _fails(
                lambda: capture_to_disk(
                    lm,
                    PROMPTS,
                    out / "partial",
                    CaptureConfig(batch_size=2, **CAPTURE),
                    progress=False,
                )
            )
        with _planted(lm, on_rank=0, after=0, error=RuntimeError(f"a bug on rank {r}")):
            res["fail_eval"] = _fails(
                lambda: evaluate(lm, PROMPTS, EvaluateConfig(max_new_tokens=2), progress=False)
            )
    if dist.is_main():  # the test's own setup, not the library's
        (out / "a_file").touch()
    dist.all_or_none(lambda: None)  # every rank sees the file from here on
    with sharding():
        res["fail_write"] = _fails(
            lambda: capture_to_disk(
                lm, PROMPTS, out / "a_file", CaptureConfig(**CAPTURE), progress=False
            )
        )
    res["writes"] = writes
    save_results(work / f"rank{r}", res)


def _dealt_encoding(lm: Any) -> dict[str, Any]:
    """``encode_set(..., encode=encode_dealt)``: the whole set on every rank, and how many prompts
    this rank tokenized for it (and for a capture); a 1-prompt set; a prompt too long."""
    import safegeom.models.chat as chat
    from safegeom.activations import capture
    from safegeom.parallel.encoding import encode_dealt

    counted: list[int] = []
    real = chat.encode_prompts

    def counting(tokenizer: Any, prompts: Any, **kwargs: Any) -> Any:
        counted.append(len(prompts))
        return real(tokenizer, prompts, **kwargs)

    kw = {"system": None, "chat_template": lm.chat_template, "encode": encode_dealt}
    chat.encode_prompts = counting  # type: ignore[assignment]
    try:
        whole = chat.encode_set(lm.tokenizer, PROMPTS, **kw)
        res: dict[str, Any] = {"encoded_counted": list(counted)}
        counted.clear()
        capture(lm, PROMPTS, CaptureConfig(batch_size=3, **CAPTURE), progress=False)
        res["capture_counted"] = list(counted)
    finally:
        chat.encode_prompts = real  # type: ignore[assignment]
    res["encoded"] = [[list(e.input_ids), e.t_inst, e.inst_start] for e in whole.encoded]
    res["encoded_meta"] = [list(whole.prompts), whole.template_hash]
    res["encoded_one"] = [
        list(e.input_ids) for e in chat.encode_set(lm.tokenizer, PROMPTS[:1], **kw).encoded
    ]
    shortest = min(len(e) for e in whole.encoded)
    res["too_long"] = _fails(
        lambda: chat.encode_set(lm.tokenizer, PROMPTS, max_positions=shortest, **kw)
    )
    res["empty"] = _fails(lambda: chat.encode_set(lm.tokenizer, [], **kw))
    return res


def helpers(work: Path) -> None:
    """Broadcast and :func:`~safegeom.parallel.ranks.alone` over the ranks; saves
    ``WORK/helpers-rank{r}``, and at exit ``WORK/exit-rank{r}.json``: whether the process group
    was still up once the library's exit handler had run (this path never calls ``close``)."""
    import atexit

    from safegeom.parallel import ranks as dist

    r = int(os.environ["RANK"])
    exit_file = work / f"exit-rank{r}.json"
    # registered before the library's handler, so it runs after it (atexit runs last in, first out)
    atexit.register(lambda: exit_file.write_text(json.dumps(torch.distributed.is_initialized())))
    assert dist.rank() == r
    res: dict[str, Any] = {"rank": r}
    res["broadcast"] = dist.broadcast({"from": r, "tensor": torch.tensor([r, 10])})
    res["broadcast_none"] = dist.broadcast(None if r == 0 else "ignored")
    with dist.alone():
        with dist.alone():  # blocks nest
            res["nested"] = [dist.rank(), dist.world_size()]
        res["alone"] = [dist.rank(), dist.world_size(), dist.is_main(), list(dist.shard(3))]
        res["alone_deal"] = dist.deal([[0, 1], [2]])
        res["alone_collect"] = dist.collect(f"from {r}", to="main")
        res["alone_gather"] = dist.gather(["x", "y"], [0, 1], 2)
        res["alone_broadcast"] = dist.broadcast(f"own {r}")
        # a failure on rank 1 alone, in an all_or_none that waits for no other rank
        res["alone_fail"] = _fails(lambda: dist.all_or_none(_fail_on, 1, r))
    res["after"] = [dist.rank(), dist.world_size(), dist.collect(r)]
    save_results(work / f"helpers-rank{r}", res)


def late(work: Path) -> None:
    """Rank 1 comes to a collective 8 s late, under ``SAFEGEOM_DIST_TIMEOUT_S`` (set by the test):
    saves each rank's failure and seconds waited as ``WORK/late-rank{r}.json``."""
    import time

    from safegeom.parallel import ranks as dist

    r = int(os.environ["RANK"])
    (work / f"ready{r}").touch()  # both ranks imported: the group forms within the short timeout
    while not all((work / f"ready{i}").exists() for i in range(2)):
        time.sleep(0.02)
    dist.collect(r)  # forms the group, with the environment's timeout
    if r == 1:
        time.sleep(8)
    start = time.monotonic()
    failure = _fails(lambda: dist.collect(r))
    record = {"failure": failure, "waited": time.monotonic() - start}
    (work / f"late-rank{r}.json").write_text(json.dumps(record))


def _fail_on(bad: int, r: int) -> None:
    from safegeom.errors import SafegeomError

    if r == bad:
        raise SafegeomError(f"failed alone on rank {r}")


def _record_made(log: list[str]) -> None:
    """Log every folder made and every file renamed into place (``os.mkdir``, ``os.replace``)."""
    import os

    real_mkdir, real_replace = os.mkdir, os.replace

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        log.append(str(path))
        real_mkdir(path, *args, **kwargs)

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        log.append(str(dst))
        real_replace(src, dst, *args, **kwargs)

    os.mkdir, os.replace = mkdir, replace  # type: ignore[assignment]


def audit_cli(work: Path, args: list[str]) -> None:
    """Run ``safegeom ARGS`` (the CLI) on this rank; saves its exit status, every path it wrote,
    made or renamed into place, and the models it measured, as ``WORK/audit-rank{r}.json``."""
    import os

    import pandas as pd

    import safegeom.audit.measure as measure_mod
    import safegeom.cli.audit as cli_audit
    from safegeom.cli import main as cli

    torch.set_num_threads(1)
    r = int(os.environ["RANK"])  # the CLI tears the process group down before it returns
    writes: list[str] = []
    _record_writes(writes)
    _record_made(writes)
    measured: list[str] = []
    real = measure_mod.measure_checkpoint

    def logged(lm: Any, *rest: Any, **kwargs: Any) -> Any:
        measured.append(lm.name)
        return real(lm, *rest, **kwargs)

    measure_mod.measure_checkpoint = logged  # type: ignore[assignment]
    returned: dict[str, Any] = {}
    real_audit = cli_audit.audit

    def audit(*rest: Any, **kwargs: Any) -> Any:
        result = real_audit(*rest, **kwargs)
        returned.update(
            hash=int(pd.util.hash_pandas_object(result.table).sum()),
            checkpoints=list(result.checkpoints),
            complete=result.manifest["complete"],
        )
        return result

    cli_audit.audit = audit  # type: ignore[assignment]
    code = cli(args)
    record = {"code": code, "writes": writes, "measured": measured, "returned": returned}
    (work / f"audit-rank{r}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    from safegeom.parallel.ranks import close

    if sys.argv[1] == "helpers":
        helpers(Path(sys.argv[2]))  # left to the library's exit handler
    elif sys.argv[1] == "late":
        late(Path(sys.argv[2]))
    elif sys.argv[1] == "audit":
        audit_cli(Path(sys.argv[2]), sys.argv[3:])  # the CLI closes the group itself
    else:
        main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
        close()  # as a script should: tear the gloo group down before the interpreter exits
