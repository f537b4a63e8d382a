"""Throughput of capture and evaluation with 1 and 2 processes on CPU, as scaling efficiency.

Three library paths, each sharded by the library itself under a launcher
(:mod:`safegeom.parallel.capture`, :mod:`safegeom.parallel.evaluation`): ``capture``
(:func:`safegeom.activations.capture` in memory: ``resid_pre``, every layer, ``t_post``, gathered on
every rank), ``stats`` (:func:`~safegeom.activations.capture_stats`: float64 means, merged across the
ranks) and ``evaluate`` (:func:`safegeom.evaluation.evaluate`: greedy generation of a few tokens,
the substring judge, refusal scores).

Method: every *job* is started as a launcher starts one: a process per rank with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``,
``OMP_NUM_THREADS=1`` (one torch thread) and no GPU (gloo between the ranks). The 1-process job
(``WORLD_SIZE=1``) runs the library's plain one-process path. Each rank builds the same
random-weight Llama (a config and a seed, tiny-chat's shipped tokenizer and chat template; nothing
is downloaded) and the same random prompts, runs every path once on the whole prompt set
(warm-up: it also forms the process group; warmed on two batches per rank only, the first timed
call ran 7-20% slower than the next ones, one or two processes alike), then per path waits for
every rank (a barrier) and times the call alone. A job's time is its slowest rank's; throughput is prompts / that time.

A *repeat* runs one 1-process job and one 2-process job back to back (the order alternates from
repeat to repeat, so a change in background load hits both alike). Reported per path: the median
1-process and 2-process prompts/s, and the scaling efficiency, ``throughput(2) / (2 ×
throughput(1))`` = ``t1 / (2 · t2)``, the median over repeats of each repeat's pair (goal ≥ 0.9,
"0.9× linear"). Only ratios travel: absolute speeds depend on the machine. "same results": every
job returned the same activation sums, merged means, completions and refusal scores.

Usage::

    python benchmarks/bench_scale.py --json scale.json    # d=256 Llama, 640 prompts, ~2-3 minutes
    python benchmarks/bench_scale.py --paths capture,stats --prompts 1280 --repeats 5
"""

# No `from __future__ import annotations`: the dataclass of a script loaded by path needs real ones.
import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safegeom.models import LoadConfig

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.9
"""Scaling efficiency the issue asks for (fraction of linear)."""
WORLDS = (1, 2)
"""Processes per job."""
PATHS: dict[str, str] = {
    "capture": "capture (in memory)",
    "stats": "capture statistics",
    "evaluate": "evaluate (generation)",
}
"""Path key → label in the table, in the order they run."""
SEED = 0
"""Seed of the weights (the prompts draw from ``SEED + 1``)."""


@dataclass(frozen=True)
class Preset:
    """The model shape and the workload of one benchmark."""

    hidden: int
    """Width of the residual stream."""
    layers: int
    """Decoder blocks."""
    heads: int
    """Attention heads (as many key/value heads)."""
    intermediate: int
    """MLP width."""
    n_prompts: int
    """Prompts per timed call (``--prompts`` overrides)."""
    min_tokens: int
    """Fewest random tokens in a prompt's text (before the chat template)."""
    max_tokens: int
    """Most random tokens in a prompt's text."""
    batch_size: int
    """Prompts per forward pass, fixed so both jobs run the same batches (``--batch-size``)."""
    new_tokens: int
    """Tokens ``evaluate`` generates per prompt (``--new-tokens``)."""


PRESETS: dict[str, Preset] = {
    # 3.2M decoder parameters (+0.8M LM head, tiny-chat's 3,072 tokens); 40 batches, 20 per rank.
    "cpu": Preset(
        hidden=256,
        layers=4,
        heads=4,
        intermediate=688,
        n_prompts=640,
        min_tokens=32,
        max_tokens=64,
        batch_size=16,
        new_tokens=8,
    ),
    # The smoke test's (tests/test_bench_scale.py): seconds, not a measurement.
    "tiny": Preset(
        hidden=32,
        layers=2,
        heads=4,
        intermediate=64,
        n_prompts=16,
        min_tokens=6,
        max_tokens=12,
        batch_size=4,
        new_tokens=2,
    ),
}


# --------------------------------------------------------------------------------------------
# Worker side: one rank of a job.


def build(preset: Preset) -> tuple[Any, list[str]]:
    """The random-weight Llama (tiny-chat's tokenizer and template) and the prompts, the same on
    every rank and in every job (seeded).

    Returns:
        ``(lm, prompts)``: a :class:`safegeom.models.LoadedModel` on the CPU and the prompt texts.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from safegeom.models import load_model

    lm = load_model("tiny-chat", LoadConfig(device="cpu"))
    small = lm.base.config
    config = LlamaConfig(
        hidden_size=preset.hidden,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.heads,
        intermediate_size=preset.intermediate,
        vocab_size=small.vocab_size,
        max_position_embeddings=max(512, small.max_position_embeddings),
        pad_token_id=small.pad_token_id,
        bos_token_id=small.bos_token_id,
        eos_token_id=small.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).eval()
    lm = dataclasses.replace(
        lm, model=model, source="random", name=f"random-llama-{preset.hidden}x{preset.layers}"
    )
    generator = torch.Generator().manual_seed(SEED + 1)
    special = set(lm.tokenizer.all_special_ids)
    pool = torch.tensor([i for i in range(small.vocab_size) if i not in special])
    lengths = torch.randint(
        preset.min_tokens, preset.max_tokens + 1, (preset.n_prompts,), generator=generator
    )
    draw = [pool[torch.randint(len(pool), (n,), generator=generator)] for n in lengths.tolist()]
    return lm, [lm.tokenizer.decode(ids.tolist(), skip_special_tokens=True) for ids in draw]


def run_path(lm: Any, path: str, prompts: list[str], preset: Preset) -> dict[str, Any]:
    """Run one path on ``prompts`` (sharded by the library under a launcher).

    Returns:
        What it returned, reduced to a check: floats (sums) and hashes, equal in every job.
    """
    import torch

    from safegeom.activations import CaptureConfig, capture, capture_stats
    from safegeom.evaluation import EvaluateConfig, evaluate

    if path == "capture":
        data = capture(lm, prompts, CaptureConfig(batch_size=preset.batch_size), progress=False)
        data = data.data["resid_pre"]
        return {"shape": list(data.shape), "sum": float(data.double().sum())}
    if path == "stats":
        stats = capture_stats(
            lm, prompts, CaptureConfig(batch_size=preset.batch_size), progress=False
        )
        return {"n_forward": stats.n_forward, "sum": float(stats.mean("resid_pre").sum())}
    if path == "evaluate":
        settings = EvaluateConfig(max_new_tokens=preset.new_tokens, batch_size=preset.batch_size)
        result = evaluate(lm, prompts, settings, progress=False)
        text = "\x00".join(result.completions).encode()
        scores = torch.as_tensor(result.scores, dtype=torch.float64)
        return {"completions": hashlib.sha256(text).hexdigest()[:16], "sum": float(scores.sum())}
    raise ValueError(f"unknown path {path!r}: use {', '.join(PATHS)}")


def worker(spec: dict[str, Any]) -> None:
    """One rank: build, warm up every path, then time each path's call between barriers; writes
    ``{out}/rank{r}.json`` (``seconds`` and ``check`` per path; rank 0 adds ``tokens``). The
    library shares its work out inside :func:`~safegeom.parallel.dispatch.sharding`."""
    from safegeom.parallel.dispatch import sharding

    with sharding():
        _timed_paths(spec)


def _timed_paths(spec: dict[str, Any]) -> None:
    """:func:`worker`'s body."""
    preset = Preset(**spec["preset"])
    import torch
    from transformers.utils import logging as hf_logging

    from safegeom.generation import encode_chat
    from safegeom.parallel import ranks as dist

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    lm, prompts = build(preset)
    world, r = dist.world_size(), dist.rank()
    for path in spec["paths"]:  # warm-up on the whole set (a smaller one left the first call slow)
        run_path(lm, path, prompts, preset)
    out: dict[str, Any] = {
        "rank": r,
        "world": world,
        "threads": torch.get_num_threads(),
        "seconds": {},
        "check": {},
    }
    for path in spec["paths"]:
        if world > 1:
            dist.collect(None, to="all")  # every rank starts the call together
        started = time.perf_counter()
        out["check"][path] = run_path(lm, path, prompts, preset)
        out["seconds"][path] = time.perf_counter() - started
    if r == 0:
        n = [len(e) for e in encode_chat(lm, prompts, None)]
        out["tokens"] = {"min": min(n), "mean": statistics.fmean(n), "max": max(n)}
    Path(spec["out"], f"rank{r}.json").write_text(json.dumps(out))
    dist.close()


# --------------------------------------------------------------------------------------------
# Launcher side: start the jobs, collect, summarise.


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(world: int, spec: dict[str, Any], work: Path, timeout: float) -> list[dict[str, Any]]:
    """Run this script's worker as ``world`` ranks with the environment a launcher sets, logs in
    ``work``; kill every rank on a hang; once more on a new port if the port was taken.

    Returns:
        Every rank's result (:func:`worker`), in rank order.

    Raises:
        RuntimeError: a rank failed or ran past ``timeout`` seconds (the tail of its stderr).
    """
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps({**spec, "out": str(work)}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "CUDA"))}
    env.update(
        MASTER_ADDR="127.0.0.1",
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        TQDM_DISABLE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_file)]
    for _attempt in range(2):
        env["MASTER_PORT"] = str(_free_port())
        logs = [work / f"rank{r}.err" for r in range(world)]
        procs = []
        for r, log in enumerate(logs):
            with log.open("w") as errors:
                procs.append(
                    subprocess.Popen(
                        command,
                        cwd=ROOT,
                        stdout=errors,
                        stderr=subprocess.STDOUT,
                        env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                    )
                )
        deadline = time.monotonic() + timeout
        # A rank that fails outside a collective leaves the others waiting: stop at once.
        while time.monotonic() < deadline and not any(p.poll() for p in procs):
            if all(p.poll() == 0 for p in procs):
                break
            time.sleep(0.05)
        codes = [p.poll() for p in procs]  # None: still running (killed now)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        texts = [log.read_text() for log in logs]
        if all(c == 0 for c in codes):
            return [json.loads((work / f"rank{r}.json").read_text()) for r in range(world)]
        if not any("address already in use" in t.lower() for t in texts):
            break
    failed = [r for r, c in enumerate(codes) if c] or [r for r, c in enumerate(codes) if c is None]
    bad = failed[0]  # the first that failed, else the first still running at the deadline
    why = f"ran past {timeout:.0f} s" if codes[bad] is None else f"exited with status {codes[bad]}"
    tail = "\n".join(texts[bad].strip().splitlines()[-15:])
    raise RuntimeError(f"rank {bad} of the {world}-process job {why}:\n{tail}")


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two checks agree (floats to 1e-9 relative: merged float64 means round apart)."""
    return a.keys() == b.keys() and all(
        math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-12)
        if isinstance(a[k], float)
        else a[k] == b[k]
        for k in a
    )


def summarise(jobs: list[dict[str, Any]], paths: list[str], n_prompts: int) -> dict[str, Any]:
    """Per path, from the jobs (``{"repeat", "world", "ranks"}``) of every repeat.

    Returns:
        ``{path: {...}}``: ``seconds`` (per world, the slowest rank's per repeat), ``prompts_per_s``
        (per world, median over repeats), ``efficiencies`` (per repeat, ``t1 / (2 t2)``),
        ``efficiency`` (their median), ``goal``, ``goal_met``, ``same`` (every job agreed)."""
    out: dict[str, Any] = {}
    for path in paths:
        seconds: dict[int, list[float]] = {w: [] for w in WORLDS}
        checks = []
        for job in jobs:  # in repeat order: seconds[1][k] and seconds[2][k] are repeat k's
            seconds[job["world"]].append(max(r["seconds"][path] for r in job["ranks"]))
            checks.extend(r["check"][path] for r in job["ranks"])
        rate = {w: statistics.median(n_prompts / t for t in seconds[w]) for w in WORLDS}
        ratios = [t1 / (2 * t2) for t1, t2 in zip(seconds[1], seconds[2], strict=True)]
        efficiency = statistics.median(ratios)
        out[path] = {
            "label": PATHS[path],
            "seconds": {str(w): seconds[w] for w in WORLDS},
            "prompts_per_s": {str(w): rate[w] for w in WORLDS},
            "efficiencies": ratios,
            "efficiency": efficiency,
            "goal": GOAL,
            "goal_met": efficiency >= GOAL,
            "same": all(_same(c, checks[0]) for c in checks),
        }
    return out


def run_benchmark(
    preset: Preset,
    paths: list[str],
    repeats: int,
    *,
    timeout: float = 600.0,
    progress: bool = True,
) -> dict[str, Any]:
    """``repeats`` rounds of a 1-process and a 2-process job (alternating order).

    Returns:
        ``jobs`` (every rank's result per job), ``results`` (:func:`summarise`) and ``tokens``
        (chat-templated prompt lengths: min, mean, max).
    """
    from tqdm import tqdm

    spec = {"preset": asdict(preset), "paths": paths}
    jobs = []
    bar = tqdm(total=repeats * len(WORLDS), desc="jobs", unit="job", disable=not progress)
    with tempfile.TemporaryDirectory() as tmp, bar:
        for rep in range(repeats):
            for world in WORLDS if rep % 2 == 0 else WORLDS[::-1]:
                work = Path(tmp) / f"r{rep}-w{world}"
                work.mkdir()
                bar.set_postfix_str(f"repeat {rep + 1}, {world} process(es)")
                jobs.append(
                    {"repeat": rep, "world": world, "ranks": launch(world, spec, work, timeout)}
                )
                bar.update(1)
    return {
        "jobs": jobs,
        "results": summarise(jobs, paths, preset.n_prompts),
        "tokens": jobs[0]["ranks"][0]["tokens"],
    }


def print_report(results: dict[str, Any]) -> None:
    """Print the table: prompts/s with 1 and 2 processes and the scaling efficiency per path."""
    head = (
        f"{'path':<24}{'1 proc p/s':>12}{'2 proc p/s':>12}{'efficiency':>12}"
        f"{'goal':>8}  verdict     same results"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for res in results.values():
        verdict = "met" if res["goal_met"] else "missed"
        rate = res["prompts_per_s"]
        print(
            f"{res['label']:<24}{rate['1']:>12.1f}{rate['2']:>12.1f}{res['efficiency']:>11.3f}x"
            f"{res['goal']:>7.2f}x  {verdict:<12}{'yes' if res['same'] else 'NO'}"
        )
    print(
        "\np/s: prompts per second of the job (its slowest rank), median over repeats; "
        "efficiency: throughput(2) / (2 x throughput(1)), the median over repeats of each "
        "repeat's pair; same results: the 2-process jobs returned what 1 process did."
    )


def _versions() -> dict[str, str]:
    """Python's version and those of the installed packages the jobs run on."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for package in ("torch", "transformers", "accelerate", "safegeom"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[package] = md.version(package)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (module docstring), print the table; ``--json`` writes every number."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per timed call")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per forward pass")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens evaluate generates")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of jobs (median reported)")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma list of paths")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per job")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(json.loads(args.worker.read_text()))
        return 0
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not paths or any(p not in PATHS for p in paths):
        parser.error(f"--paths must be among {', '.join(PATHS)}, got {args.paths!r}")
    checks = (
        ("--prompts", args.prompts, 2),
        ("--batch-size", args.batch_size, 1),
        ("--new-tokens", args.new_tokens, 1),
        ("--repeats", args.repeats, 1),
    )
    for name, value, least in checks:
        if value is not None and value < least:
            parser.error(f"{name} must be at least {least}, got {value}")
    given = {
        "n_prompts": args.prompts,
        "batch_size": args.batch_size,
        "new_tokens": args.new_tokens,
    }
    given = {k: v for k, v in given.items() if v is not None}
    preset = dataclasses.replace(PRESETS[args.preset], **given)
    print(
        f"preset {args.preset}: Llama d={preset.hidden}, {preset.layers} layers, float32; "
        f"{preset.n_prompts} prompts of {preset.min_tokens}-{preset.max_tokens} random tokens, "
        f"batch {preset.batch_size}, {preset.new_tokens} new tokens; {platform.machine()} CPU "
        f"({os.cpu_count()} cores), 1 thread per process; {args.repeats} repeats of "
        f"{' and '.join(map(str, WORLDS))} processes",
        flush=True,
    )
    started = time.perf_counter()
    try:
        run = run_benchmark(
            preset, paths, args.repeats, timeout=args.timeout, progress=not args.no_progress
        )
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    tokens = run["tokens"]
    print(
        f"prompt tokens with the chat template: {tokens['min']}-{tokens['max']} (mean "
        f"{tokens['mean']:.1f}); whole run {time.perf_counter() - started:.0f} s"
    )
    print_report(run["results"])
    if args.json:
        payload = {
            "preset": args.preset,
            "config": asdict(preset),
            "repeats": args.repeats,
            "device": f"{platform.machine()} CPU, {os.cpu_count()} cores",
            "versions": _versions(),
            **run,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
