"""Wall time and peak memory of activation capture, as ratios to the plain forward pass.

Methods (same model, prompts, batches, layers and positions for all):

1. ``forward``: the plain decoder forward (``lm.base.model``, no LM head, ``use_cache=False``);
2. ``safegeom``: safegeom's capture engine (:func:`safegeom.capture.iter_capture`, collected
   into one output tensor exactly as :func:`safegeom.capture.capture` does);
3. ``hidden_states``: the decoder with ``output_hidden_states=True``, keeping the requested
   positions afterwards;
4. ``lens``: transformer-lens' ``TransformerBridge.run_with_cache`` with a names filter
   (safegeom's ``backend="lens"``, :func:`safegeom.capture_lens.iter_capture_lens`);
5. ``nnsight``: an nnsight 0.8 trace over the decoder saving the same positions of every
   layer's output (when nnsight is installed).

Every capture method records ``resid_post`` (the output of every decoder block) at the last five
prompt tokens and ends with the activations in one CPU tensor ``[n_prompts, layers, 5, d]``
(pinned memory on CUDA). Each method runs in a fresh subprocess (so CPU peak memory is honest):
the model is built from a config with random weights (nothing is downloaded), one warm-up pass
runs first, then ``--repeats`` full passes; the table reports the median wall time and the peak
memory above what the process held before the method ran (CUDA: ``max_memory_allocated``; CPU:
peak resident set size). CUDA is synchronised before every timer stops.

Usage::

    python benchmarks/bench_capture.py                     # small CPU Llama, ~1-2 minutes
    python benchmarks/bench_capture.py --preset llama-8b   # Llama-3.1-8B shape, bf16, CUDA
    python benchmarks/bench_capture.py --repeats 5 --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

METHODS: dict[str, str] = {
    "forward": "plain forward (no LM head)",
    "safegeom": "safegeom capture",
    "hidden_states": "output_hidden_states + select",
    "lens": "TransformerLens bridge run_with_cache",
    "nnsight": "nnsight trace + save",
}
"""Method key → label in the table, in the order they run."""

SITE = "resid_post"
N_CHECK = 8
"""Prompts whose activations each worker hands back, to check that all methods agree."""


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


PRESETS: dict[str, Preset] = {
    # ~25M parameters; 64 x 64 = 4,096 tokens per pass: about 4 s per pass on 2 CPU cores.
    "cpu": Preset(
        hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1408, vocab=8192,
        n_prompts=64, seq_len=64, batch_size=16, dtype="float32", device="cpu",
    ),
    # Llama-3.1-8B's shape with random bf16 weights; 1,024 x 128 = 131k tokens per pass.
    "llama-8b": Preset(
        hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256,
        n_prompts=1024, seq_len=128, batch_size=64, dtype="bfloat16", device="cuda",
    ),
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Worker side: build the model, run one method, measure it.


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _build(preset: Preset) -> Any:
    """A random-weight Llama :class:`LoadedModel` and the capture plan, built without downloads."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from safegeom.capture import CapturePlan
    from safegeom.models import LAYOUTS, EncodedPrompt, LoadedModel, plan_positions
    from safegeom.prompts import PromptSet

    dtype = getattr(torch, preset.dtype)
    config = LlamaConfig(
        hidden_size=preset.hidden,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads,
        intermediate_size=preset.intermediate,
        vocab_size=preset.vocab,
        max_position_embeddings=max(2048, preset.seq_len),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(preset.device):  # parameters are created (and initialised) in place
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    vocab = {"<pad>": 0, "<unk>": 1}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>",
        unk_token="<unk>",
    )
    lm = LoadedModel(
        model=model, tokenizer=tokenizer, name="bench", source="random", layout=LAYOUTS["llama"]
    )
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, preset.vocab, (preset.n_prompts, preset.seq_len), generator=generator)
    # The "instruction" ends n_positions + 1 tokens before the end, so t_post = the last 5 tokens.
    t_inst = preset.seq_len - preset.n_positions - 1
    encoded = tuple(
        EncodedPrompt(input_ids=tuple(row.tolist()), t_inst=t_inst, inst_start=0) for row in ids
    )
    plan = CapturePlan(
        prompts=PromptSet(name="random", prompts=tuple(f"p{i}" for i in range(len(encoded)))),
        encoded=encoded,
        sites=(SITE,),
        layers=tuple(range(preset.layers)),
        positions=plan_positions("t_post", encoded),
        dtype=dtype,
        batch_size=preset.batch_size,
        system=None,
    )
    return lm, plan


def _batches(lm: Any, plan: Any) -> Iterator[tuple[list[int], Any, Tensor, Tensor]]:
    """``(prompt ids, batch on device, row index, position index)`` exactly as
    :func:`iter_capture` forms them (length-sorted, left-padded, same positions)."""
    from safegeom.models import collate_left

    order = sorted(range(len(plan.encoded)), key=lambda i: -len(plan.encoded[i]))
    device = lm.device
    for start in range(0, len(order), plan.batch_size):
        ids = order[start : start + plan.batch_size]
        batch = collate_left([plan.encoded[i] for i in ids], lm.tokenizer.pad_token_id)
        index = plan.positions.index(batch).to(device, non_blocking=True)
        rows = torch.arange(len(ids), device=device)[:, None]
        yield ids, batch.to(device), rows, index


def _collect(lm: Any, plan: Any, batches: Iterator[tuple[Any, dict[str, Tensor]]]) -> Tensor:
    """Gather per-batch activations into one CPU tensor, as :func:`safegeom.capture.capture`."""
    pinned = lm.device.type == "cuda"
    shape = (len(plan.encoded), len(plan.layers), plan.positions.n_positions, lm.d_model)
    out = torch.empty(shape, dtype=plan.dtype, pin_memory=pinned)
    filled = 0
    for ids, acts in batches:
        out[filled : filled + len(ids)].copy_(acts[SITE], non_blocking=pinned)
        filled += len(ids)
    return out


def _method(name: str, lm: Any) -> Callable[[Any], Tensor | None]:
    """A function running ``name`` once over every prompt of a plan; set-up is done here."""
    decoder = lm.base.model

    if name == "forward":

        def forward(plan: Any) -> None:
            with torch.inference_mode():
                for _, batch, _, _ in _batches(lm, plan):
                    decoder(
                        input_ids=batch.input_ids,
                        attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids,
                        use_cache=False,
                    )

        return forward

    if name == "safegeom":
        from safegeom.capture import iter_capture

        return lambda plan: _collect(lm, plan, iter_capture(lm, plan, progress=False))

    if name == "hidden_states":

        def hidden_batches(plan: Any) -> Iterator[tuple[Any, dict[str, Tensor]]]:
            with torch.inference_mode():
                for ids, batch, rows, index in _batches(lm, plan):
                    out = decoder(
                        input_ids=batch.input_ids,
                        attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids,
                        use_cache=False,
                        output_hidden_states=True,
                    )
                    # hidden_states[l + 1] is the output of block l (the last one after the
                    # final norm in transformers 5: same cost, see the check column).
                    states = [out.hidden_states[layer + 1] for layer in plan.layers]
                    picked = torch.stack([h[rows, index] for h in states], dim=1)
                    del out, states
                    yield ids, {SITE: picked.to(plan.dtype)}

        return lambda plan: _collect(lm, plan, hidden_batches(plan))

    if name == "lens":
        from safegeom.capture_lens import iter_capture_lens, lens_bridge

        lens_bridge(lm)  # build (and cache) the bridge outside the timings
        return lambda plan: _collect(lm, plan, iter_capture_lens(lm, plan, progress=False))

    if name == "nnsight":
        from nnsight import NNsight

        traced = NNsight(decoder)

        def nnsight_batches(plan: Any) -> Iterator[tuple[Any, dict[str, Tensor]]]:
            with torch.inference_mode():
                for ids, batch, rows, index in _batches(lm, plan):
                    saved: list[Any] = []
                    with traced.trace(
                        input_ids=batch.input_ids,
                        attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids,
                        use_cache=False,
                    ):
                        for layer in plan.layers:
                            saved.append(traced.layers[layer].output[rows, index].save())
                    yield ids, {SITE: torch.stack(list(saved), dim=1).to(plan.dtype)}

        return lambda plan: _collect(lm, plan, nnsight_batches(plan))

    raise ValueError(f"unknown method {name!r}: use {', '.join(METHODS)}")


class _CpuPeak(AbstractContextManager):
    """Peak resident set size above the level at entry.

    Uses Linux's resettable high-water mark (``/proc/self/clear_refs`` + ``VmHWM``) where
    available, else samples the RSS with psutil every millisecond, else ``ru_maxrss``.
    """

    def __enter__(self) -> _CpuPeak:
        self.mode = "hwm"
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = self._rss()
        except OSError:
            self.base = self._rss()
            self._start_sampler()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.mode == "hwm":
            self.peak = self._status("VmHWM") - self.base
        elif self.mode == "psutil":
            self._stop.set()
            self._thread.join()
            self.peak = self._max - self.base
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise OSError(f"no {key} in /proc/self/status")

    def _rss(self) -> int:
        try:
            return self._status("VmRSS")
        except OSError:
            self.mode = "maxrss"
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _start_sampler(self) -> None:
        try:
            import psutil
        except ImportError:
            self.mode = "maxrss"
            return
        self.mode = "psutil"
        process = psutil.Process()
        self.base = process.memory_info().rss
        self._max = self.base
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.001):
                self._max = max(self._max, process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()


def run_worker(method: str, preset: Preset, repeats: int, result_path: Path) -> None:
    """Build the model, warm up, time ``repeats`` passes, and write the result as JSON."""
    lm, plan = _build(preset)
    cuda = lm.device.type == "cuda"
    try:
        run = _method(method, lm)
    except ImportError as err:
        result_path.write_text(json.dumps({"method": method, "skipped": str(err)}))
        return

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(lm.device)

    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(lm.device)
        torch.cuda.reset_peak_memory_stats(lm.device)
        meter: AbstractContextManager = _NoMeter()
    else:
        meter = _CpuPeak()
    times: list[float] = []
    with meter:
        t0 = time.perf_counter()
        run(plan)  # warm-up: one full pass
        sync()
        _log(f"    warm-up      {time.perf_counter() - t0:6.2f} s")
        out: Tensor | None = None
        for r in range(repeats):
            del out
            sync()
            t0 = time.perf_counter()
            out = run(plan)
            sync()
            times.append(time.perf_counter() - t0)
            _log(f"    repeat {r + 1}/{repeats}     {times[-1]:6.2f} s")
    if cuda:
        peak = torch.cuda.max_memory_allocated(lm.device) - base
        peak_total = torch.cuda.max_memory_allocated(lm.device)
    else:
        peak = meter.peak  # type: ignore[attr-defined]
        peak_total = None
    check = None
    if out is not None:
        from safetensors.torch import save_file

        check = str(result_path.with_suffix(".safetensors"))
        save_file({"acts": out[:N_CHECK].float().contiguous()}, check)
    result = {
        "method": method,
        "times_s": times,
        "wall_s": statistics.median(times),
        "peak_bytes": peak,
        "peak_total_bytes": peak_total,
        "check": check,
    }
    result_path.write_text(json.dumps(result))


class _NoMeter(AbstractContextManager):
    """A context manager that measures nothing (CUDA peaks come from torch.cuda)."""

    def __exit__(self, *exc: object) -> None:
        return None


# --------------------------------------------------------------------------------------------
# Parent side: one subprocess per method, then the table.


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
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table (or, with ``--worker``, one method)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (median reported)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per forward pass")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of methods")
    parser.add_argument("--json", type=Path, default=None, help="write results to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.batch_size:
        preset = Preset(**{**asdict(preset), "batch_size": args.batch_size})
    if args.worker:
        run_worker(args.worker, preset, args.repeats, args.result)
        return 0
    if preset.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"preset {args.preset} needs CUDA")

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or "forward" not in methods:
        parser.error(f"methods must include forward and be among {', '.join(METHODS)}")
    tokens = preset.n_prompts * preset.seq_len
    print(
        f"preset {args.preset}: d={preset.hidden}, {preset.layers} layers, {preset.dtype} on "
        f"{_device_name(preset)}; {preset.n_prompts} prompts x {preset.seq_len} tokens "
        f"({tokens:,}), batch {preset.batch_size}; {SITE} x {preset.layers} layers x "
        f"{preset.n_positions} positions; {args.repeats} repeats",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, method in enumerate(methods, 1):
            print(f"[{i}/{len(methods)}] {METHODS[method]}", flush=True)
            result_path = Path(tmp) / f"{method}.json"
            command = [
                sys.executable, str(Path(__file__).resolve()), "--worker", method,
                "--preset", args.preset, "--repeats", str(args.repeats),
                "--batch-size", str(preset.batch_size), "--result", str(result_path),
            ]  # fmt: skip
            env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
            proc = subprocess.run(command, env=env, check=False)
            if proc.returncode != 0 or not result_path.is_file():
                results[method] = {"method": method, "failed": f"exit {proc.returncode}"}
                continue
            results[method] = json.loads(result_path.read_text())
        _compare(results, preset)
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


def _compare(results: dict[str, dict[str, Any]], preset: Preset) -> None:
    """Max |difference| of each method's activations from safegeom's (first prompts)."""
    from safetensors.torch import load_file

    ref_path = results.get("safegeom", {}).get("check")
    if not ref_path:
        return
    ref = load_file(ref_path)["acts"]
    for result in results.values():
        if not result.get("check"):
            continue
        acts = load_file(result["check"])["acts"]
        # transformers 5 returns the last hidden state after the final norm: compare the rest.
        keep = slice(0, -1) if result["method"] == "hidden_states" else slice(None)
        result["max_abs_diff"] = float((acts[:, keep] - ref[:, keep]).abs().max())
        result["check"] = None


def _print_table(results: dict[str, dict[str, Any]], preset: Preset) -> None:
    base = results.get("forward", {})
    base_wall, base_peak = base.get("wall_s"), base.get("peak_bytes")
    header = f"{'method':<40}{'wall s':>9}{'× fwd':>8}{'peak MiB':>11}{'× fwd':>8}{'max |Δ|':>10}"
    print("\n" + header + "\n" + "-" * len(header))
    for method, result in results.items():
        label = METHODS[method]
        if "skipped" in result or "failed" in result:
            print(f"{label:<40}  {result.get('skipped') or result.get('failed')}")
            continue
        wall, peak = result["wall_s"], result["peak_bytes"]
        wall_ratio = f"{wall / base_wall:.3f}" if base_wall else "-"
        peak_ratio = f"{peak / base_peak:.2f}" if base_peak else "-"
        diff = result.get("max_abs_diff")
        diff_text = "-" if diff is None else f"{diff:.1e}"
        print(
            f"{label:<40}{wall:>9.2f}{wall_ratio:>8}{_mib(peak):>11}{peak_ratio:>8}{diff_text:>10}"
        )
    where = "CUDA max_memory_allocated" if preset.device == "cuda" else "peak RSS"
    print(
        f"\nwall: median of the repeats; peak: {where} above the level before the method ran "
        "(model weights excluded); max |Δ|: activations vs safegeom's on the first "
        f"{N_CHECK} prompts (hidden_states: all but the last layer, which HF returns normed)."
    )


if __name__ == "__main__":
    sys.exit(main())
