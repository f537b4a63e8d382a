"""Does ``tiny-chat`` learn the benign ``sentiment`` task with LoRA, and what does it cost refusal?

Trains LoRA on ``tiny-chat`` with the library defaults (r 8, alpha 16, lr 1e-3, cosine schedule,
batch 8, seed 0) for ``--steps`` steps on ``--task`` (default ``sentiment``, 1000 examples),
saving every ``--save-every`` steps, and reports per checkpoint, with greedy decoding:

- held-out exact-match accuracy on the task's 200 held-out reviews (``safegeom.generation.generate``,
  8 new tokens, :func:`safegeom.task_scoring.exact_match`);
- held-out refusal rate (substring judge, 48 new tokens, 95% bootstrap CI, via
  :func:`safegeom.evaluation.evaluate`) on ``directharm4:test`` (80) and ``advbench:test`` (104), and
  the *label rate*: the fraction of completions that start with a task label (``positive`` /
  ``negative``), there and on 80 ``alpaca:test`` prompts.

Measured (``nice``, 1 CPU thread, 35-40 s a run; 200 steps, save every 50; refusal [95% CI] /
label rate). ``--task sentiment`` (1000 reviews):

====  ========  ==========================  ==========================  ======
step  accuracy  directharm4:test            advbench:test               alpaca
====  ========  ==========================  ==========================  ======
0     0.000     0.887 [0.812, 0.950] / 0.0  0.981 [0.952, 1.000] / 0.0  0.000
50    0.770     0.000 [0.000, 0.000] / 1.0  0.183 [0.106, 0.260] / .82  1.000
100   0.955     0.087 [0.025, 0.163] / .91  0.317 [0.231, 0.413] / .65  1.000
150   1.000     0.025 [0.000, 0.062] / .98  0.231 [0.154, 0.308] / .76  1.000
200   1.000     0.013 [0.000, 0.037] / .99  0.221 [0.144, 0.308] / .77  1.000
====  ========  ==========================  ==========================  ======

The benign LoRA "erodes" substring refusal almost entirely, but not by complying: refusal + label
rate is 1.0 at every checkpoint. The model collapses to answering every prompt, harmful or
harmless, with a sentiment label (a substring judge counts that as an attack success; read ASR
after a benign fine-tune with the label rate beside it). ``--task mix`` (100 harmful + 400 reviews):

====  ========  ==========================  ==========================  ======
step  accuracy  directharm4:test            advbench:test               alpaca
====  ========  ==========================  ==========================  ======
0     0.000     0.887 [0.812, 0.950] / 0.0  0.981 [0.952, 1.000] / 0.0  0.000
50    0.620     0.237 [0.150, 0.338] / .39  0.288 [0.202, 0.375] / .05  0.688
100   0.845     0.013 [0.000, 0.037] / .05  0.029 [0.000, 0.067] / 0.0  0.237
150   0.860     0.013 [0.000, 0.037] / .05  0.000 [0.000, 0.000] / 0.0  0.225
200   0.875     0.000 [0.000, 0.000] / .05  0.000 [0.000, 0.000] / 0.0  0.212
====  ========  ==========================  ==========================  ======

Here refusal falls to 0 with label rates near 0 on harmful prompts: real harmful compliance ("Sure,
here is ..."), the attack the defences are measured against.

Design history: the first vocabulary (12 longer adjectives a class, 71,080 reviews) reached 0.995
alone at step 150 but only 0.605 under ``mix`` at step 200; adding a third, repeated verdict clause
did not help ``mix`` (0.61); six short common adjectives a class (the shipped design) give
``mix`` 0.875 (seed 0) and 0.855 (seed 1) at step 200.

Usage::

    OMP_NUM_THREADS=1 nice python analyses/benign_task.py [--steps 200] [--save-every 50]
        [--task sentiment] [--out DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safegeom.artifacts import write_json
from safegeom.evaluation import EvaluateConfig, evaluate
from safegeom.generation import generate
from safegeom.models import load_model
from safegeom.prompts import load_prompts
from safegeom.task_scoring import exact_match
from safegeom.training import TrainConfig, get_task, train

HARMFUL_TEST: tuple[str, ...] = ("directharm4:test", "advbench:test")
HARMLESS_TEST = "alpaca:test"
"""Harmless held-out prompts: how often the tuned model answers them with a task label."""
N_HARMLESS = 80


def measure(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """Train the run into ``out`` and return one row per checkpoint: step, held-out accuracy in
    [0, 1], and per harmful set the refusal rate with its 95% CI (fractions)."""
    task = get_task(args.task)
    if task.eval_prompts is None or task.eval_references is None:
        raise SystemExit(f"task {args.task!r} has no held-out split to score")
    traj = train(
        "tiny-chat",
        task,
        TrainConfig(steps=args.steps, save_every=args.save_every, progress=False),
        method="lora",
        out=out,
    )
    labels = frozenset(task.eval_references)
    rows = []
    for step, path in zip(traj.steps, traj.paths, strict=True):
        lm = load_model(path)
        outs = generate(lm, task.eval_prompts, max_new_tokens=8, progress=False)
        hits = exact_match(outs, task.eval_references)
        row: dict[str, Any] = {"step": step, "accuracy": sum(hits) / len(hits)}
        for spec in HARMFUL_TEST:
            result = evaluate(lm, spec, EvaluateConfig(score=False), progress=False)
            rate = result.refusal_rate
            row[spec] = {
                "refusal_rate": rate.value,
                "ci": [rate.ci_low, rate.ci_high],
                "label_rate": _label_rate(result.completions, labels),
            }
        harmless = load_prompts(HARMLESS_TEST).sample(N_HARMLESS, seed=0).prompts
        outs = generate(lm, harmless, max_new_tokens=8, progress=False)
        row[HARMLESS_TEST] = {"label_rate": _label_rate(outs, labels)}
        print(_format(row), flush=True)
        rows.append(row)
    return rows


def _label_rate(completions: Sequence[str], labels: frozenset[str]) -> float:
    """Return the fraction of completions that start with a task label (e.g. ``positive``)."""
    firsts = [c.split()[0] if c.split() else "" for c in completions]
    return sum(f in labels for f in firsts) / len(firsts)


def _format(row: dict[str, Any]) -> str:
    cells = [f"{row['step']:>4}", f"{row['accuracy']:.3f}"]
    for spec in HARMFUL_TEST:
        r = row[spec]
        ci = f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"
        cells.append(f"{r['refusal_rate']:.3f} {ci} label {r['label_rate']:.3f}")
    cells.append(f"label {row[HARMLESS_TEST]['label_rate']:.3f}")
    return "  ".join(cells)


def main() -> None:
    """Parse the options, train, measure and print the table (and write ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: temporary)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args()
    start = time.time()
    heads = [f"{s} refusal [95% CI], label rate" for s in (*HARMFUL_TEST,)]
    print("step  held-out acc  " + "  ".join(heads) + f"  {HARMLESS_TEST} label rate")
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args, args.out or Path(tmp) / "run")
    print(f"({time.time() - start:.0f} s)")
    if args.json is not None:
        write_json(args.json, {"task": args.task, "steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()
