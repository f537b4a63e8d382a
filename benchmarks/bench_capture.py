"""Wall time and peak memory of activation capture, as ratios to the plain forward pass.

Methods (same model, prompts, batches, layers and positions for all):

1. ``forward``: the plain decoder forward (``lm.base.model``, no LM head, ``use_cache=False``);
2. ``safegeom``: safegeom's capture engine (:func:`safegeom.activations.iter_capture`, collected
   into one output tensor exactly as :func:`safegeom.activations.capture` does);
3. ``hidden_states``: the decoder with ``output_hidden_states=True``, keeping the requested
   positions afterwards;
4. ``transformer_lens``: transformer-lens' ``TransformerBridge.run_with_cache`` with a names
   filter (safegeom's ``backend="transformer_lens"``, :mod:`safegeom.activations.transformer_lens`);
5. ``nnsight``: an nnsight 0.8 trace over the decoder saving the same positions of every
   layer's output (when nnsight is installed).

Every capture method records ``resid_post`` (the output of every decoder block) at the last five
prompt tokens and ends with the activations in one CPU tensor ``[n_prompts, layers, 5, d]``
(pinned memory on CUDA). The model is built from a config with random weights, or, with the
``smol-chat`` preset, is the bundled smol-chat as ``load_model`` returns it (SmolLM2-135M-Instruct
with its LoRA adapter, unmerged); the prompts are random token ids either way; nothing is
downloaded.

Time: one process runs every method, *interleaved batch by batch* (the order rotates from batch
to batch), so a background load or clock change hits all methods alike; a warm-up round runs
first, then ``--repeats`` rounds over the whole prompt set. CUDA is synchronised before every
timer stops. The table gives each method's median pass time and, as its ratio to the plain
forward, the median over all batches of all rounds of (its time for the batch / the plain
forward's time for the same batch in the same round), robust to load spikes on a shared box.

Memory: CUDA: ``max_memory_allocated`` above the allocation before the method's pass (model
weights excluded). CPU: each method runs one pass in a fresh subprocess, and the peak resident
set size above the level before the pass is reported (a shared process would reuse freed memory).

Usage::

    python benchmarks/bench_capture.py                     # small CPU Llama, ~1-2 minutes
    python benchmarks/bench_capture.py --preset llama-8b   # Llama-3.1-8B shape, bf16, CUDA
    python benchmarks/bench_capture.py --preset smol-chat --threads 1   # the bundled smol-chat
    python benchmarks/bench_capture.py --repeats 5 --json results.json
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from capture_methods import (
    METHODS,
    SITE,
    Steps,
    build_model_and_plan,
    make_method,
    sync_device,
)
from peak_rss import CpuPeak
from torch import Tensor


@dataclass(frozen=True)
class Preset:
    """A benchmark configuration: model shape, workload and where it runs."""

    hidden: int
    """Width of the residual stream."""
    layers: int
    """Decoder blocks (all are captured)."""
    heads: int
    """Attention heads."""
    kv_heads: int
    """Key/value heads (grouped-query attention)."""
    intermediate: int
    """MLP width."""
    vocab: int
    """Vocabulary size."""
    n_prompts: int
    """Prompts per pass."""
    seq_len: int
    """Tokens per prompt (random ids)."""
    batch_size: int
    """Prompts per forward pass (``--batch-size`` overrides)."""
    dtype: str
    """Parameter and storage dtype."""
    device: str
    """``cpu`` or ``cuda``."""
    n_positions: int = 5
    """Positions captured per prompt: the last ``n_positions`` tokens."""
    model: str | None = None
    """A bundled model loaded with ``load_model`` instead of random weights (``smol-chat``); the
    shape fields above are then that model's, checked when it loads."""
    merge_adapter: bool = False
    """``model`` is a PEFT adapter: fold it into its base first (``LoadConfig.merge_adapter``)."""


PRESETS: dict[str, Preset] = {
    # ~25M parameters; 48 x 64 = 3,072 tokens per pass: about 3 s per pass on one CPU core.
    "cpu": Preset(
        hidden=512,
        layers=8,
        heads=8,
        kv_heads=8,
        intermediate=1408,
        vocab=8192,
        n_prompts=48,
        seq_len=64,
        batch_size=16,
        dtype="float32",
        device="cpu",
    ),
    # The shipped smol-chat (SmolLM2-135M-Instruct + its LoRA adapter, as load_model returns it,
    # unmerged), its own weights; the same 48 x 64 random-id prompts as ``cpu``.
    "smol-chat": Preset(
        hidden=576,
        layers=30,
        heads=9,
        kv_heads=3,
        intermediate=1536,
        vocab=49152,
        n_prompts=48,
        seq_len=64,
        batch_size=16,
        dtype="float32",
        device="cpu",
        model="smol-chat",
    ),
    # Llama-3.1-8B's shape with random bf16 weights; 1,024 x 128 = 131k tokens per pass.
    "llama-8b": Preset(
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=8,
        intermediate=14336,
        vocab=128256,
        n_prompts=1024,
        seq_len=128,
        batch_size=64,
        dtype="bfloat16",
        device="cuda",
    ),
}


# --------------------------------------------------------------------------------------------
# Worker side: build the model, run one method, measure it.


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _one_pass(steps: Steps, plan: Any) -> dict[str, Tensor]:
    sink: dict[str, Tensor] = {}
    for _ in steps(plan, sink):
        pass
    return sink


def time_interleaved(
    lm: Any, plan: Any, methods: dict[str, Steps], repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, dict[str, Tensor]]]:
    """Run all methods batch by batch in rotating order; round 0 is the warm-up.

    Returns:
        Per method: its pass times in the timed rounds; its per-step times (one step per batch,
        plus the final step that ends the pass), aligned across methods; and its last outputs.
    """
    times: dict[str, list[float]] = {m: [] for m in methods}
    step_times: dict[str, list[float]] = {m: [] for m in methods}
    sinks: dict[str, dict[str, Tensor]] = {}
    for round_ in range(repeats + 1):
        sinks = {m: {} for m in methods}
        steps = {m: fn(plan, sinks[m]) for m, fn in methods.items()}
        total = dict.fromkeys(methods, 0.0)
        per_step: dict[str, list[float]] = {m: [] for m in methods}
        active, k = list(methods), 0
        while active:
            shift = k % len(active)
            for m in active[shift:] + active[:shift]:
                sync_device(lm)
                t0 = time.perf_counter()
                try:
                    next(steps[m])
                except StopIteration:
                    active.remove(m)
                sync_device(lm)
                per_step[m].append(time.perf_counter() - t0)
                total[m] += per_step[m][-1]
            k += 1
        what = "warm-up" if round_ == 0 else f"round {round_}/{repeats}"
        line = "  ".join(f"{m} {t:.2f}s" for m, t in total.items())
        _log(f"  {what:<12} {line}")
        if round_:
            for m, t in total.items():
                times[m].append(t)
                step_times[m].extend(per_step[m])
    return times, step_times, sinks


def measure_memory(lm: Any, plan: Any, steps: Steps) -> int:
    """Peak memory of one pass above the level before it, in bytes."""
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(lm.device)
        torch.cuda.reset_peak_memory_stats(lm.device)
        _one_pass(steps, plan)
        torch.cuda.synchronize(lm.device)
        return torch.cuda.max_memory_allocated(lm.device) - base
    with CpuPeak() as meter:
        _one_pass(steps, plan)
    return meter.peak


def memory_worker(method: str, preset: Preset, result_path: Path) -> None:
    """CPU memory of one method, in this (fresh) process; the result is written as JSON."""
    lm, plan = build_model_and_plan(preset)
    try:
        steps = make_method(method, lm)
    except ImportError as err:
        result_path.write_text(json.dumps({"skipped": str(err)}))
        return
    result_path.write_text(json.dumps({"peak_bytes": measure_memory(lm, plan, steps)}))


# --------------------------------------------------------------------------------------------
# Driver and table.


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "transformer-lens", "nnsight", "safegeom"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = "not installed"
    return out


def _device_name(preset: Preset) -> str:
    if preset.device == "cuda":
        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cuda (absent)"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads"


def _cpu_memory(methods: list[str], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Run :func:`memory_worker` for every method in its own subprocess."""
    out: dict[str, dict[str, Any]] = {}
    # A fixed mmap threshold makes glibc return large freed blocks to the OS at once, so the
    # resident set follows the live tensors instead of the allocator's caching.
    env = {**os.environ, "TQDM_DISABLE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    with tempfile.TemporaryDirectory() as tmp:
        for i, method in enumerate(methods, 1):
            path = Path(tmp) / f"{method}.json"
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--memory-worker",
                method,
                "--preset",
                args.preset,
                "--batch-size",
                str(args.batch_size or 0),
                "--threads",
                str(args.threads or 0),
                "--result",
                str(path),
            ]
            t0 = time.perf_counter()
            proc = subprocess.run(command, check=False, env=env)
            ok = proc.returncode == 0 and path.is_file()
            out[method] = json.loads(path.read_text()) if ok else {"failed": proc.returncode}
            took = time.perf_counter() - t0
            _log(f"  memory [{i}/{len(methods)}] {METHODS[method]:<40} {took:5.1f} s")
    return out


def _max_abs_diff(method: str, out: Tensor, ref: Tensor) -> float:
    # transformers 5 returns the last hidden state after the final norm: compare the others.
    keep = slice(0, -1) if method == "hidden_states" else slice(None)
    return float((out[:, keep].float() - ref[:, keep].float()).abs().max())


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per forward pass")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of methods")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.batch_size:
        preset = Preset(**{**asdict(preset), "batch_size": args.batch_size})
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(args.memory_worker, preset, args.result)
        return 0
    if preset.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"preset {args.preset} needs CUDA")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if any(m not in METHODS for m in methods) or "forward" not in methods:
        parser.error(f"--methods must include forward and be among {', '.join(METHODS)}")

    tokens = preset.n_prompts * preset.seq_len
    print(
        f"preset {args.preset}: {preset.model or 'random'} Llama d={preset.hidden}, {preset.layers} layers, {preset.dtype} "
        f"on {_device_name(preset)}; {preset.n_prompts} prompts x {preset.seq_len} tokens "
        f"({tokens:,}), batch {preset.batch_size}; {SITE} x {preset.layers} layers x "
        f"{preset.n_positions} positions; warm-up + {args.repeats} rounds",
        flush=True,
    )
    lm, plan = build_model_and_plan(preset)
    steps: dict[str, Steps] = {}
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        try:
            steps[method] = make_method(method, lm)
            results[method] = {"method": method, "label": METHODS[method]}
        except ImportError as err:
            results[method] = {"method": method, "label": METHODS[method], "skipped": str(err)}

    _log("memory (one pass each)")
    if preset.device == "cuda":
        for method, fn in steps.items():
            results[method]["peak_bytes"] = measure_memory(lm, plan, fn)
            _log(f"  {METHODS[method]:<40} {results[method]['peak_bytes'] / 2**20:,.0f} MiB")
    else:
        for method, memory in _cpu_memory(list(steps), args).items():
            results[method].update(memory)

    _log("time (batches interleaved across methods)")
    times, step_times, sinks = time_interleaved(lm, plan, steps, args.repeats)
    reference = sinks.get("safegeom", {}).get("out")
    n_batches = -(-len(plan.encoded) // plan.batch_size)
    for method, values in times.items():
        # Paired per batch: each batch's time over the plain forward's time for the same batch
        # of the same round (run moments apart); the final, batch-less step is left out.
        pairs = [
            t / f
            for i, (t, f) in enumerate(zip(step_times[method], step_times["forward"], strict=True))
            if i % (n_batches + 1) < n_batches
        ]
        round_ratios = [t / f for t, f in zip(values, times["forward"], strict=True)]
        results[method].update(
            times_s=values,
            wall_s=statistics.median(values),
            ratio=statistics.median(pairs),
            round_ratios=round_ratios,
        )
        out = sinks[method].get("out")
        if out is not None and reference is not None:
            results[method]["max_abs_diff"] = _max_abs_diff(method, out, reference)
    del sinks

    _print_table(results, preset)
    if args.json:
        payload = {
            "preset": args.preset,
            "config": asdict(preset),
            "repeats": args.repeats,
            "device": _device_name(preset),
            "versions": _versions(),
            "results": list(results.values()),
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0


def _print_table(results: dict[str, dict[str, Any]], preset: Preset) -> None:
    base_peak = results.get("forward", {}).get("peak_bytes")
    header = f"{'method':<40}{'wall s':>8}{'x fwd':>8}{'peak MiB':>10}{'x fwd':>8}{'max |d|':>10}"
    print("\n" + header + "\n" + "-" * len(header))
    for result in results.values():
        label = result["label"]
        if "skipped" in result or "wall_s" not in result:
            print(f"{label:<40}  skipped: {result.get('skipped', 'failed')}")
            continue
        peak = result.get("peak_bytes")
        peak_text = "-" if peak is None else f"{peak / 2**20:,.0f}"
        peak_ratio = f"{peak / base_peak:.2f}" if peak is not None and base_peak else "-"
        diff = result.get("max_abs_diff")
        diff_text = "-" if diff is None else f"{diff:.1e}"
        print(
            f"{label:<40}{result['wall_s']:>8.2f}{result['ratio']:>8.3f}{peak_text:>10}"
            f"{peak_ratio:>8}{diff_text:>10}"
        )
    where = "CUDA max_memory_allocated" if preset.device == "cuda" else "peak RSS (own process)"
    print(
        "\nwall: median pass time; x fwd: median over batches and rounds of (time / the plain "
        f"forward's time for the same batch, run moments apart); peak: {where} above the level before the pass (weights excluded); "
        f"max |d|: largest difference from safegeom's activations (hidden_states: all layers "
        "but the last, which transformers returns after the final norm)."
    )


if __name__ == "__main__":
    sys.exit(main())
