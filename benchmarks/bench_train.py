"""Step time and peak memory of every training method, as ratios to a LoRA step in the same run.

Each method's trainable, step loss and optimizer are built from the blocks
:func:`safegeom.training.train` uses (``load_model``, the method's ``prepare``, ``run_config``,
the state's ``wrap``, ``encode_examples``, :class:`~safegeom.training.step.StepLoss`, ``make_optimizer``,
under ``accelerate``, deterministic kernels on), and one step is train's loop body,
:func:`~safegeom.training.optim.optimizer_step` (loss, backward, clip, optimizer and scheduler step),
then the loss and its terms read back. Every method steps through the same batches (the run's data
order, seed 0).

Rows (``train_methods.VARIANTS``): ``lora`` (the baseline), ``sft``, ``refusalguard``
(``GuardConfig()``: the LoRA variant with the geometry penalty every 2 steps on 8 harmful
calibration prompts), three RefusalGuard rows that change one setting (``refusalguard-every1``:
``penalty_every=1``; ``refusalguard-calib4``: ``calib_batch=4``; ``refusalguard-reft``: the reft
edit), ``kl``, ``adaptive``, and ``r2d2-m1``/``r2d2-m5`` (R2D2 with m = 1 or 5 GCG steps per
training step, ``train_methods.R2D2``). Goals (the issue): RefusalGuard ≤ 1.3× a LoRA step, adaptive
≤ 1.6×. An R2D2 step is split into its attack (``gcg_s``: the GCG steps on the sampled test cases;
``pool_s``: the pool's loss and ASR measured on the current model) and its training (``train_s``:
the rest: the utility, away and toward forwards, backward and optimizer step), each the median
over the timed steps; ``train x LoRA`` is the median of the training part over LoRA's step time.

Time: every method runs its warm-up steps, then the timed rounds run one step of every method per
round in rotating order (ABC, BCA, ...), so background load hits all alike. Rounds are grouped in
blocks of b (b = the least common multiple of the rows' ``penalty_every``, so each block holds
whole penalty cycles: the same mix of penalised and plain steps); ``x LoRA`` is the median over
blocks of (the method's block time / LoRA's time for the same block), ``step s`` the median block
time over b. CUDA is synchronised around each step.

Memory: the peak during the warm-up steps (at least b, so a penalised step is among them) above
the level just before the first step (model, defence and trainable built; optimizer state,
gradients and activations count). CUDA: ``max_memory_allocated`` in this process. CPU: each method
in a fresh subprocess, peak resident set (``peak_rss.CpuPeak``), the set-up read back from this
run's folder.

``tok/step`` counts the token positions a timed step feeds to the decoder (a forward-pre-hook),
padding and every forward included: the task batch, the reference forward of kl and adaptive, and
RefusalGuard's penalty forward, which runs the decoder alone (no LM head) over the step's
calibration prompts padded among themselves, on penalised steps only. ``calib`` is that last part
(decoder positions that never reach the head), per step averaged over the timed steps.

Set-up (once per run, before any step): RefusalGuard's cones and calibration cache, adaptive's risk
probe and the risk scores of the task prompts, in seconds and in LoRA steps. RefusalGuard rows
whose cones are fitted alike share the first one's cones (the same fit), so theirs is the cache
alone.

Usage::

    python benchmarks/bench_train.py --threads 1                 # tiny-chat on mix, 1-2 minutes
    python benchmarks/bench_train.py --preset llama-large --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from safegeom.config import config_dict
from safegeom.training.methods.r2d2 import R2D2State

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_rss import CpuPeak
from train_methods import (
    PRESETS,
    VARIANTS,
    Preset,
    Runner,
    block_size,
    build_runner,
    defence_key,
    quiet_loading,
    sync_device,
)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class AttackClock:
    """Seconds an R2D2 runner spends attacking: in GCG (``pool.advance``) and in the rest of
    ``R2D2State.attack`` (the reset and the pool's measurement), summed since it was made."""

    def __init__(self, state: R2D2State) -> None:
        self.gcg = 0.0
        """Seconds in GCG so far."""
        self.attack = 0.0
        """Seconds in the whole attack so far (GCG included)."""
        advance, attack = state.pool.advance, state.attack

        def timed_advance(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return advance(*args, **kwargs)
            finally:
                self.gcg += time.perf_counter() - started

        def timed_attack(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return attack(*args, **kwargs)
            finally:
                self.attack += time.perf_counter() - started

        state.pool.advance = timed_advance  # type: ignore[method-assign]
        state.attack = timed_attack  # type: ignore[method-assign]

    def read(self) -> tuple[float, float]:
        """``(GCG seconds, pool-measure seconds)`` so far."""
        return self.gcg, self.attack - self.gcg


def memory_worker(spec: dict[str, Any]) -> None:
    """CPU peak memory of one method's warm-up steps in this (fresh) process; writes JSON."""
    torch.set_num_threads(int(spec["threads"]))
    quiet_loading()
    torch.use_deterministic_algorithms(True, warn_only=True)
    preset = Preset(**spec["preset"])
    runner, _ = build_runner(
        spec["method"],
        preset,
        Accelerator(cpu=True),
        Path(spec["root"]),
        fresh=False,
        total_steps=int(spec["total_steps"]),
    )
    with CpuPeak() as meter:
        for step in range(int(spec["warmup"])):
            runner.step(step)
    Path(spec["result"]).write_text(json.dumps({"peak_bytes": meter.peak}))


def _cpu_memory(names: list[str], spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Run :func:`memory_worker` for every method in its own subprocess."""
    out: dict[str, dict[str, Any]] = {}
    # glibc returns large freed blocks at once, so the resident set follows the live tensors.
    env = {
        **os.environ,
        "TQDM_DISABLE": "1",
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "PYTHONWARNINGS": "ignore::FutureWarning",
    }
    for i, name in enumerate(names, 1):
        path = Path(spec["root"]) / f"memory-{name}.json"
        payload = json.dumps({**spec, "method": name, "result": str(path)})
        command = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", payload]
        started = time.perf_counter()
        proc = subprocess.run(command, check=False, env=env)
        ok = proc.returncode == 0 and path.is_file()
        out[name] = json.loads(path.read_text()) if ok else {"failed": proc.returncode}
        _log(f"  memory [{i}/{len(names)}] {name:<22} {time.perf_counter() - started:5.1f} s")
    return out


def run_benchmark(
    preset: Preset, names: list[str], *, device: str, memory: bool = True, progress: bool = True
) -> dict[str, Any]:
    """Build every method, measure memory, then time interleaved rounds (module docstring).

    Returns:
        JSON-ready: ``rows`` (per method: ``step_s`` seconds, ``ratio`` to LoRA, ``goal``,
        ``goal_met``, ``tokens_per_step`` (decoder positions fed, padding included, every
        forward), ``calib_tokens_per_step`` (of those, the penalty's calibration prompts), their
        per-step lists, ``peak_bytes``, ``peak_ratio``, ``guard`` (the RefusalGuard settings)),
        ``setup`` (part, method, ``seconds``,
        ``lora_steps``), ``block``, ``warmup`` and ``steps`` (timed steps per method).
    """
    b = block_size(names)
    warmup, steps = max(preset.warmup, b), b * -(-preset.steps // b)
    acc = Accelerator(cpu=device == "cpu")
    dev = acc.device
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
            runners: dict[str, Runner] = {}
            setup: list[dict[str, Any]] = []
            seen: set[str] = set()
            _log("set-up (method by method)")
            for name in names:
                key = defence_key(VARIANTS[name])
                runners[name], parts = build_runner(
                    name, preset, acc, Path(tmp), fresh=key not in seen, total_steps=warmup + steps
                )
                seen.add(key)
                setup += [{"part": k, "method": name, "seconds": v} for k, v in parts.items()]
            peaks: dict[str, dict[str, Any]] = {n: {} for n in names}
            _log("warm-up" + (" (CUDA memory)" if dev.type == "cuda" and memory else ""))
            if dev.type == "cuda":  # cuBLAS' handles and workspace, before the first method's peak
                x = torch.ones(64, 64, device=dev, requires_grad=True)
                (x @ x).sum().backward()
            for name, runner in runners.items():
                sync_device(dev)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                    base = torch.cuda.memory_allocated(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                for step in range(warmup):
                    runner.step(step)
                sync_device(dev)
                if dev.type == "cuda" and memory:
                    peaks[name] = {"peak_bytes": torch.cuda.max_memory_allocated(dev) - base}
            if memory and dev.type != "cuda":
                _log("memory (a subprocess per method)")
                spec = {
                    "preset": asdict(preset),
                    "root": tmp,
                    "warmup": warmup,
                    "total_steps": warmup + steps,
                    "threads": torch.get_num_threads(),
                }
                peaks = _cpu_memory(names, spec)
            clocks = {
                n: AttackClock(r.step_loss.state)
                for n, r in runners.items()
                if isinstance(r.step_loss.state, R2D2State)
            }
            times, tokens, attack = time_rounds(runners, warmup, steps, dev, progress, clocks)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    results = summarise(names, times, tokens, peaks, setup, b)
    return results | {"warmup": warmup, "steps": steps, "r2d2": split_r2d2(times, attack)}


def split_r2d2(
    times: dict[str, list[float]], attack: dict[str, list[tuple[float, float]]]
) -> list[dict[str, Any]]:
    """The R2D2 rows' timed steps split into attack and training (module docstring).

    Returns:
        Per R2D2 row: ``gcg_s``, ``pool_s``, ``train_s`` and ``step_s`` (medians over the timed
        steps, seconds), ``lora_s`` (LoRA's median step), ``train_ratio`` and ``step_ratio``
        (medians over rounds of the training part and of the whole step over LoRA's step).
    """
    lora, rows = times["lora"], []
    for name, parts in attack.items():
        whole = times[name]
        train = [w - g - p for w, (g, p) in zip(whole, parts, strict=True)]
        rows.append(
            {
                "method": name,
                "label": VARIANTS[name].label,
                "gcg_steps": VARIANTS[name].r2d2.gcg_steps,  # type: ignore[union-attr]
                "gcg_s": statistics.median(g for g, _ in parts),
                "pool_s": statistics.median(p for _, p in parts),
                "train_s": statistics.median(train),
                "step_s": statistics.median(whole),
                "lora_s": statistics.median(lora),
                "train_ratio": statistics.median(t / b for t, b in zip(train, lora, strict=True)),
                "step_ratio": statistics.median(w / b for w, b in zip(whole, lora, strict=True)),
                "attack_parts_s": parts,
            }
        )
    return rows


def time_rounds(
    runners: dict[str, Runner],
    first: int,
    rounds: int,
    device: torch.device,
    progress: bool,
    clocks: dict[str, AttackClock] | None = None,
) -> tuple[
    dict[str, list[float]], dict[str, list[tuple[int, int]]], dict[str, list[tuple[float, float]]]
]:
    """One step of every method per round, in rotating order (steps ``first`` on).

    Returns:
        ``(seconds, positions, attack)``: per method, each timed step's wall seconds and its
        ``(decoder positions, of those the ones that reached the LM head)``, in step order; per
        method of ``clocks``, each step's ``(GCG seconds, pool-measure seconds)``.
    """
    clocks = clocks or {}
    attack: dict[str, list[tuple[float, float]]] = {n: [] for n in clocks}
    names, times = list(runners), {n: [] for n in runners}
    tokens: dict[str, list[tuple[int, int]]] = {n: [] for n in runners}
    bar = tqdm(total=rounds * len(names), desc="timed steps", disable=not progress)
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            sync_device(device)
            runner = runners[name]
            before = runner.positions, runner.head
            clock = clocks[name].read() if name in clocks else (0.0, 0.0)
            started = time.perf_counter()
            runner.step(first + r)
            sync_device(device)
            times[name].append(time.perf_counter() - started)
            if name in clocks:
                gcg, pool = clocks[name].read()
                attack[name].append((gcg - clock[0], pool - clock[1]))
            tokens[name].append((runner.positions - before[0], runner.head - before[1]))
            bar.update(1)
    bar.close()
    return times, tokens, attack


def summarise(
    names: list[str],
    times: dict[str, list[float]],
    tokens: dict[str, list[tuple[int, int]]],
    peaks: dict[str, dict[str, Any]],
    setup: list[dict[str, Any]],
    b: int,
) -> dict[str, Any]:
    """Ratios to LoRA per block of ``b`` rounds (see the module docstring); JSON-ready.

    ``tokens`` holds per method each timed step's ``(decoder positions, head positions)``; a row's
    ``step_tokens`` and ``step_calib_tokens`` list, per timed step, the decoder positions and those
    of the decoder-only (calibration) forward, and ``tokens_per_step``/``calib_tokens_per_step``
    their means.
    """
    blocks = {n: [sum(t[i : i + b]) for i in range(0, len(t), b)] for n, t in times.items()}
    lora_step = statistics.median(blocks["lora"]) / b
    lora_peak = peaks.get("lora", {}).get("peak_bytes")
    rows = []
    for name in names:
        variant, peak = VARIANTS[name], peaks.get(name, {}).get("peak_bytes")
        fed, calib = [t for t, _ in tokens[name]], [t - h for t, h in tokens[name]]
        ratio = statistics.median(
            t / base for t, base in zip(blocks[name], blocks["lora"], strict=True)
        )
        rows.append(
            {
                "method": name,
                "label": variant.label,
                "step_s": statistics.median(blocks[name]) / b,
                "ratio": ratio,
                "goal": variant.goal,
                "goal_met": None if variant.goal is None else ratio <= variant.goal,
                "peak_bytes": peak,
                "peak_ratio": peak / lora_peak if peak and lora_peak else None,
                "tokens_per_step": statistics.fmean(fed),
                "step_tokens": fed,
                "calib_tokens_per_step": statistics.fmean(calib),
                "step_calib_tokens": calib,
                "times_s": times[name],
                "guard": config_dict(variant.guard) if variant.method == "refusalguard" else None,
                **({"memory_failed": True} if "failed" in peaks.get(name, {}) else {}),
            }
        )
    for row in setup:
        row["lora_steps"] = row["seconds"] / lora_step
    return {"rows": rows, "setup": setup, "block": b, "lora_step_s": lora_step}


def verdict(row: dict[str, Any]) -> str:
    """``met``, ``missed by +X× (Y% over)`` or ``-`` (no goal)."""
    if row["goal"] is None:
        return "-"
    if row["goal_met"]:
        return "met"
    over = row["ratio"] - row["goal"]
    return f"missed by +{over:.2f}x ({100 * over / row['goal']:.0f}% over)"


def print_report(results: dict[str, Any]) -> None:
    """Print the step table and the set-up table."""
    head = (
        f"{'method':<32}{'step s':>9}{'x LoRA':>8}{'goal':>8}  {'verdict':<28}{'tok/step':>9}"
        f"{'calib':>7}{'peak MiB':>10}{'x LoRA':>8}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for r in results["rows"]:
        goal = "-" if r["goal"] is None else f"<={r['goal']:.1f}"
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:,.1f}"
        peak = "failed" if r.get("memory_failed") else peak
        pr = "-" if r["peak_ratio"] is None else f"{r['peak_ratio']:.2f}"
        print(
            f"{r['label']:<32}{r['step_s']:>9.4f}{r['ratio']:>8.3f}{goal:>8}  "
            f"{verdict(r):<28}{r['tokens_per_step']:>9.0f}{r['calib_tokens_per_step']:>7.0f}"
            f"{peak:>10}{pr:>8}"
        )
    if results["setup"]:
        head = f"{'set-up (once per run)':<36}{'row':<22}{'s':>8}{'LoRA steps':>12}"
        print("\n" + head + "\n" + "-" * len(head))
        for s in results["setup"]:
            print(f"{s['part']:<36}{s['method']:<22}{s['seconds']:>8.2f}{s['lora_steps']:>12.1f}")
    if results.get("r2d2"):
        head = (
            f"{'R2D2 step split':<32}{'GCG s':>9}{'pool s':>9}{'train s':>9}{'step s':>9}"
            f"{'x LoRA':>8}{'train x LoRA':>14}"
        )
        print("\n" + head + "\n" + "-" * len(head))
        for r in results["r2d2"]:
            print(
                f"{r['label']:<32}{r['gcg_s']:>9.4f}{r['pool_s']:>9.4f}{r['train_s']:>9.4f}"
                f"{r['step_s']:>9.4f}{r['step_ratio']:>8.2f}{r['train_ratio']:>14.2f}"
            )
    print(
        f"\nx LoRA: median over blocks of {results['block']} rounds of (time / LoRA's time for the "
        f"same block); {results['steps']} timed steps per method after {results['warmup']} "
        "warm-up steps; tok/step: token positions fed to the decoder per step (padding included, "
        "every forward), calib: of those, the penalty's calibration prompts (decoder only, "
        "penalised steps); peak: over the warm-up steps, above the level before the first step."
    )


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{p: md.version(p) for p in ("transformers", "peft", "accelerate", "safegeom")},
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the tables (and write ``--json``); returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny-chat")
    parser.add_argument("--methods", default=",".join(VARIANTS), help="comma list; needs lora")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per method")
    parser.add_argument("--batch-size", type=int, default=None, help="task examples per step")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        memory_worker(json.loads(args.memory_worker))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_loading()
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in VARIANTS]
    if unknown or "lora" not in names:
        parser.error(f"--methods must include lora and be among {', '.join(VARIANTS)}")
    for flag in ("steps", "warmup", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    overrides = {k: getattr(args, k) for k in ("steps", "warmup", "batch_size")}
    preset = replace(PRESETS[args.preset], **{k: v for k, v in overrides.items() if v})
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    where = (
        torch.cuda.get_device_name()
        if device.startswith("cuda")
        else (f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads")
    )
    print(
        f"preset {args.preset}: {preset.model} model, task {preset.task}, batch "
        f"{preset.batch_size}, {preset.dtype} on {where}",
        flush=True,
    )
    results = run_benchmark(
        preset, names, device=device, memory=not args.no_memory, progress=not args.no_progress
    )
    print_report(results)
    if args.json:
        payload = {
            "preset": args.preset,
            "config": asdict(preset),
            "device": where,
            "versions": _versions(),
            **results,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
