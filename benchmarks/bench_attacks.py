"""safegeom's GCG against nanoGCG 0.3, side by side, and the attack success of every attack.

Part 1, **GCG speed and loss** (issue 23's goal: ≥ 1.5× faster per step than nanoGCG at equal or
lower loss). On each model (``tiny-chat``; a random-weight ~109M-parameter Llama built here with
tiny-chat's tokenizer and chat template, nothing downloaded), both implementations attack the same
``harmbench:val`` behaviours with their HarmBench targets at the same search width, top-k, suffix
length (initial ``" x x ... x"``) and steps, one after the other per behaviour (the order
alternates), and the benchmark reports:

- wall seconds per step: the median interval between one step's gradient forward and the next
  one's (forward hooks; both run exactly one gradient forward per step), ``time.perf_counter``;
- token positions fed to the model per step, and positions whose logits the LM head computed;
- the target loss after given steps (50 and 100 on tiny-chat: the lowest loss of the steps so
  far, nats per target token), median over behaviours, as each implementation reports it; and
  after the last step *re-tokenized*: the best suffix as text, rendered and tokenized by the
  library, as a user would send it.

Settings made the same on both sides (nanoGCG's are its ``GCGConfig`` fields): ``n_replace`` 1,
``buffer_size`` 0 (each step's best candidate becomes the current string: safegeom's only mode),
``use_prefix_cache`` on, ``filter_ids`` on, ``allow_non_ascii`` off, ``early_stop`` off (fixed
step counts), seed = behaviour index, ``torch.use_deterministic_algorithms(True)`` (nanoGCG sets it
when seeded) for both. nanoGCG is given safegeom's allowed tokens (its ``not_allowed_ids``: it
would otherwise allow chat special tokens and tokens that decode to nothing) and a tokenizer copy
that adds the BOS (it strips the BOS from the rendered template and relies on the tokenizer to
add it; tiny-chat's does not); the benchmark checks that both attack the same token sequence.
Both draw their candidates with the same calls on a seeded generator, so the two searches agree
step for step as long as their filters keep the same candidates.

Differences that remain (nanoGCG's code is not changed):

- nanoGCG 0.3 pins transformers ≤ 4.47.1; here it runs on the installed transformers through
  ``attack_sides.LegacyCacheModel`` (legacy KV-cache tuples converted to ``DynamicCache`` and
  back on each call, as transformers 4.47 did internally);
- its filter re-tokenizes the suffix alone, safegeom's the whole prompt with the suffix in it;
- it computes logits at every position of a candidate (safegeom: the target's only), runs
  ``gc.collect()`` after each candidate batch and decodes its buffer for logging each step;
- its progress bar is replaced by a plain iterator (``nanogcg.gcg.tqdm``).

Part 2, **attack success** on ``harmbench:val`` with the library's judge (``substring``,
48 greedy new tokens): no attack, safegeom's GCG strings of part 1 (and nanoGCG's, as text),
AutoDAN-style search (``AutoDANConfig()``) and prefilling (the whole target) on ``tiny-chat``;
no attack and prefilling on ``smol-chat`` (skipped with the reason when it cannot load).

nanoGCG is only needed here, and is not a dependency of safegeom, not even an extra: its
``transformers<=4.47.1`` pin cannot be resolved together with safegeom's ``transformers>=5.0``
(pip: ResolutionImpossible). Install it without its dependencies, ``pip install --no-deps
nanogcg==0.3.0`` (it also imports scipy, sentencepiece and protobuf). Without it the nanoGCG side
is skipped and the reason printed.

    python benchmarks/bench_attacks.py --threads 1 --json attacks.json   # ~25 min on 1 core
    python benchmarks/bench_attacks.py --quick                           # seconds (the test)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attack_asr import asr_rows
from attack_sides import (
    GCGSettings,
    NanoSide,
    StepMeter,
    nanogcg_missing,
    retokenized_loss,
    run_nanogcg,
    run_safegeom,
    same_prompt,
)

from safegeom.attacks.targets import behaviours_and_targets
from safegeom.models import LoadConfig, load_model
from safegeom.models.loading import LoadedModel


@dataclass(frozen=True)
class Shape:
    """A random-weight Llama's shape (tiny-chat's vocabulary, tokenizer and chat template)."""

    hidden: int
    """Residual stream width."""
    layers: int
    """Decoder blocks."""
    heads: int
    """Attention heads (as many key/value heads)."""
    mlp: int
    """MLP width."""


def load_case_model(shape: Shape | None) -> LoadedModel:
    """``tiny-chat`` (``shape`` None), or a seeded random Llama of ``shape`` on tiny-chat's
    tokenizer and chat template, float32 on the CPU.

    Returns:
        The model, ready for both sides.
    """
    lm = load_model("tiny-chat", LoadConfig(device="cpu"))
    if shape is None:
        return lm
    config = copy.deepcopy(lm.base.config)
    config.hidden_size, config.num_hidden_layers = shape.hidden, shape.layers
    config.num_attention_heads = config.num_key_value_heads = shape.heads
    config.intermediate_size, config.head_dim = shape.mlp, shape.hidden // shape.heads
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    return replace(lm, model=model, name=f"random-llama-{shape.hidden}x{shape.layers}")


@dataclass(frozen=True)
class ModelCase:
    """One model of part 1 and the search run on it."""

    name: str
    """Row label."""
    shape: Shape | None
    """``None``: tiny-chat; else the random Llama's shape."""
    settings: GCGSettings
    """The GCG search both sides run."""
    behaviours: int
    """How many ``harmbench:val`` behaviours (the first ones)."""
    nogc_behaviours: int
    """On how many of them (the first ones) nanoGCG also runs with ``gc.collect`` off."""
    loss_steps: tuple[int, ...]
    """Steps after which the target loss is reported (the lowest loss of the steps so far)."""


CASES: dict[str, list[ModelCase]] = {
    "default": [
        ModelCase("tiny-chat", None, GCGSettings(32, 256, 20, 100), 10, 1, (50, 100)),
        ModelCase(
            "random Llama ~109M",
            Shape(1024, 8, 16, 2816),
            GCGSettings(32, 256, 20, 4),
            2,
            1,
            (4,),
        ),
    ],
    "quick": [
        ModelCase("tiny-chat", None, GCGSettings(8, 16, 4, 3), 2, 1, (2, 3)),
        ModelCase(
            "random Llama (tiny)", Shape(64, 2, 4, 128), GCGSettings(8, 16, 4, 3), 1, 1, (3,)
        ),
    ],
}
"""Per mode, the models of part 1 in order (``--quick``: the smoke test's)."""


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def run_side(
    side: str, lm: Any, nano: NanoSide | None, behaviour: str, target: str, case: ModelCase, i: int
) -> dict[str, Any]:
    """One side's search on behaviour ``i``, measured.

    Returns:
        Its per-step seconds, tokens and head positions, loss trace, suffix and losses.
    """
    with StepMeter(lm.model) as meter:
        if side == "safegeom":
            run = run_safegeom(lm, behaviour, target, case.settings, seed=i)
        else:
            assert nano is not None
            gc = side == "nanogcg"
            run = run_nanogcg(nano, behaviour, target, case.settings, seed=i, collect_garbage=gc)
    steps = meter.steps()
    return {
        "step_s": [s.seconds for s in steps],
        "tokens": [s.tokens for s in steps],
        "head": [s.head_positions for s in steps],
        "losses": list(run.losses),
        "best_loss": min(run.losses),
        "suffix": run.suffix,
        "retokenized_loss": retokenized_loss(lm, behaviour, run.suffix, target),
        "seconds": run.seconds,
    }


def _summary(runs: list[dict[str, Any]], loss_steps: Sequence[int]) -> dict[str, Any]:
    steps = [s for r in runs for s in r["step_s"]]
    return {
        "step_s": _median(steps),
        "loss_at": {str(k): _median([min(r["losses"][:k]) for r in runs]) for k in loss_steps},
        "tokens_per_step": statistics.fmean(t for r in runs for t in r["tokens"]),
        "head_per_step": statistics.fmean(h for r in runs for h in r["head"]),
        "loss": _median([r["best_loss"] for r in runs]),
        "retokenized_loss": _median([r["retokenized_loss"] for r in runs]),
        "intervals": len(steps),
    }


def compare(case: ModelCase, *, with_nano: bool, progress: bool) -> dict[str, Any]:
    """Part 1 on one model: both sides on each behaviour, interleaved.

    Returns:
        The case's settings, per-behaviour runs and summaries, and the ratio nanoGCG / safegeom of
        the median step times (``None`` without nanoGCG).
    """
    lm = load_case_model(case.shape)
    behaviours, targets = behaviours_and_targets("harmbench:val", limit=case.behaviours)
    nano = NanoSide(lm) if with_nano else None
    sides = ["safegeom", "nanogcg", "nanogcg-nogc"] if with_nano else ["safegeom"]
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    same = []
    for i, (b, t) in enumerate(zip(behaviours.prompts, targets, strict=True)):
        if nano is not None:
            same.append(same_prompt(lm, nano, b, t, case.settings.n_tokens))
        now = [s for s in sides if s != "nanogcg-nogc" or i < case.nogc_behaviours]
        for side in now if i % 2 == 0 else now[::-1]:
            runs[side].append(run_side(side, lm, nano, b, t, case, i))
            if progress:
                r = runs[side][-1]
                print(
                    f"  {case.name} behaviour {i} {side}: {_median(r['step_s']):.3f} s/step, "
                    f"loss {r['best_loss']:.3f}",
                    file=sys.stderr,
                    flush=True,
                )
    summary = {s: _summary(r, case.loss_steps) for s, r in runs.items()}
    ratio = nogc_ratio = None
    if with_nano:
        ratio = summary["nanogcg"]["step_s"] / summary["safegeom"]["step_s"]
        first = _summary(runs["safegeom"][: case.nogc_behaviours], case.loss_steps)
        nogc_ratio = summary["nanogcg-nogc"]["step_s"] / first["step_s"]
    return {
        "model": case.name,
        "parameters": sum(p.numel() for p in lm.model.parameters()),
        "settings": asdict(case.settings),
        "behaviours": case.behaviours,
        "nogc_behaviours": case.nogc_behaviours,
        "same_prompt_ids": same,
        "same_trajectory": _same_trajectories(runs) if with_nano else None,
        "runs": runs,
        "summary": summary,
        "speedup": ratio,
        "speedup_nogc": nogc_ratio,
        "records": runs["safegeom"],
        "lm": lm,
    }


def _same_trajectories(runs: dict[str, list[dict[str, Any]]]) -> list[bool]:
    """Per behaviour, whether both sides chose the same string at every step (same losses to
    float32 rounding of a ~10-nat loss, and the same final suffix)."""
    return [
        a["suffix"] == b["suffix"]
        and all(
            abs(x - y) <= 1e-5 * max(1.0, abs(x))
            for x, y in zip(a["losses"], b["losses"], strict=True)
        )
        for a, b in zip(runs["safegeom"], runs["nanogcg"], strict=True)
    ]


def print_tables(cases: list[dict[str, Any]], asr: list[dict[str, Any]]) -> None:
    """Part 1's and part 2's tables as Markdown."""
    print(
        "| model | side | width | top-k | suffix | steps | behaviours | s/step | tokens/step "
        "| head pos/step | loss after steps | re-tokenized loss |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for c in cases:
        st = c["settings"]
        for side, s in c["summary"].items():
            at = ", ".join(f"{v:.3f} ({k})" for k, v in s["loss_at"].items())
            print(
                f"| {c['model']} | {side} | {st['search_width']} | {st['top_k']} | "
                f"{st['n_tokens']} | {st['steps']} | {len(c['runs'][side])} | {s['step_s']:.3f} | "
                f"{s['tokens_per_step']:.0f} | {s['head_per_step']:.0f} | {at} | "
                f"{s['retokenized_loss']:.3f} |"
            )
    for c in cases:
        if c["speedup"] is not None:
            same, k = c["same_trajectory"], c["nogc_behaviours"]
            print(
                f"\n{c['model']}: nanoGCG / safegeom step time {c['speedup']:.2f}x "
                f"(goal >= 1.5x: {'met' if c['speedup'] >= 1.5 else 'missed'}); nanoGCG without "
                f"gc.collect / safegeom on the first {k}: {c['speedup_nogc']:.2f}x; same prompt ids "
                f"{sum(c['same_prompt_ids'])}/{len(same)}; same search {sum(same)}/{len(same)}"
            )
    print("\n| model | attack | behaviours | ASR | successes |")
    print("|---|---|---:|---:|---:|")
    for row in asr:
        if row.get("skipped"):
            print(f"| {row['model']} | {row['attack']} | | skipped: {row['skipped']} | |")
        else:
            print(
                f"| {row['model']} | {row['attack']} | {row['n']} | {row['asr']:.3f} | "
                f"{row['successes']} |"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (seconds)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--no-nanogcg", action="store_true", help="safegeom side only")
    parser.add_argument("--no-asr", action="store_true", help="skip part 2")
    parser.add_argument("--no-progress", action="store_true", help="no per-behaviour lines")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    missing = "--no-nanogcg given" if args.no_nanogcg else nanogcg_missing()
    if missing:
        print(f"nanoGCG side skipped: {missing}")
    start = time.perf_counter()
    cases = [
        compare(case, with_nano=missing is None, progress=not args.no_progress)
        for case in CASES["quick" if args.quick else "default"]
    ]
    asr = [] if args.no_asr else asr_rows(cases[0], quick=args.quick)
    print_tables(cases, asr)
    wall = time.perf_counter() - start
    print(f"\nwall {wall:.0f} s, torch {torch.__version__}, {args.threads} thread(s)")
    if args.json:
        for c in cases:
            c.pop("lm"), c.pop("records")
        payload = {
            "quick": args.quick,
            "threads": args.threads,
            "nanogcg_skipped": missing,
            "cases": cases,
            "asr": asr,
            "wall_s": wall,
            "machine": platform.platform(),
            "versions": _versions(),
        }
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "nanogcg", "safegeom"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = ""
    return out


if __name__ == "__main__":
    raise SystemExit(main())
