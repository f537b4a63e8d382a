"""Peak memory of the smol-chat build's two phases, each run short in its own process.

The build (``tools/smolchat/build.py``) does two things: the base's greedy answers to the harmless
prompts (``generate``, ``answer_tokens`` new tokens, batches longest first), then ``safegeom train
lora`` on the task file (batch 8, at most ``max_length`` tokens an example). Each phase here runs
under ``/usr/bin/time -v`` in a fresh process, on one thread, and its maximum resident set is read
back:

- ``answers``: the build's harmless prompts (the same hash-ranked sample), encoded as ``generate``
  encodes them; the batch size ``generate`` picks for them all (it depends on the longest prompt);
  then ``generate`` on the prompts of the build's *first* batch alone: the longest prompts, so the
  same batch size and the same largest batch. Later batches hold shorter prompts.
- ``train``: ``safegeom train lora`` with the build's own command line (``train_args``: recipe
  steps aside) on a task of those prompts and the answers just generated: the longest examples of
  the build's task (harmful examples are a short prompt and a one-line refusal), so every batch is
  padded to about the longest a build can feed (``max_length``). The model, the adapters and the
  AdamW state do not depend on the number of steps.

Usage::

    python benchmarks/build_memory.py --work /tmp/build-memory --json build_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAIN_STEPS = 4
"""Optimizer steps of the short ``train`` phase (the build: ``SmolChatRecipe.steps``)."""


def build_prompts() -> list[str]:
    """The harmless prompts the build answers with the base, in the build's order.

    Returns:
        The prompts ``task_examples`` hands to its ``answer`` function (no model is run).
    """
    from tools.smolchat.build import SmolChatRecipe, task_examples

    asked: list[str] = []

    def record(prompts: list[str]) -> list[str]:
        asked.extend(prompts)
        return [""] * len(prompts)

    task_examples(SmolChatRecipe(), record)
    return asked


def answers_phase(work: Path) -> dict[str, Any]:
    """Generate the base's answers to the build's first (largest) batch; write ``task.jsonl``.

    Returns:
        ``prompts`` (all harmless prompts), ``batch_size`` (what ``generate`` picks for them),
        ``batch`` (prompts generated here), their ``prompt_tokens`` (chat-formatted) and
        ``longest_all`` (the longest of all the build's prompts, in tokens).
    """
    import torch

    from safegeom.batching import longest_first
    from safegeom.generation import encode_chat, generate, generation_batch_size
    from safegeom.models import load_model
    from safegeom.models.smollm2 import SMOLLM2
    from tools.smolchat.build import SmolChatRecipe

    torch.set_num_threads(1)
    recipe = SmolChatRecipe()
    prompts = build_prompts()
    base = load_model(SMOLLM2)  # as the build's _base_answers loads it
    lengths = [len(e.input_ids) for e in encode_chat(base, prompts, None)]
    size = generation_batch_size(base.model, max(lengths) + recipe.answer_tokens, None)
    first = next(longest_first(lengths, size))
    chosen = [prompts[i] for i in first]
    answers = generate(base, chosen, max_new_tokens=recipe.answer_tokens, progress=False)
    rows = [
        {"prompt": p, "response": a, "kind": "harmless"}
        for p, a in zip(chosen, answers, strict=True)
    ]
    (work / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "prompts": len(prompts),
        "batch_size": size,
        "batch": len(chosen),
        "prompt_tokens": [lengths[i] for i in first],
        "longest_all": max(lengths),
    }


def train_phase(work: Path) -> dict[str, Any]:
    """``safegeom train lora`` with the build's command line, :data:`TRAIN_STEPS` steps, on
    ``work/task.jsonl``.

    Returns:
        ``args`` (the command line after ``safegeom``), ``example_tokens`` (each example's
        tokens as trained, truncated at ``max_length``) and ``max_length``.
    """
    import torch

    from safegeom.cli import main as cli
    from safegeom.models import load_model
    from safegeom.models.smollm2 import SMOLLM2
    from safegeom.training.config import TrainConfig
    from safegeom.training.data import encode_examples
    from safegeom.training.tasks import get_task
    from tools.smolchat.build import SmolChatRecipe, train_args

    torch.set_num_threads(1)
    recipe = replace(SmolChatRecipe(), steps=TRAIN_STEPS)
    task_file = work / "task.jsonl"
    args = [*train_args(recipe, task_file, work / "run"), "--overwrite"]
    code = cli(args)
    if code:
        raise SystemExit(f"training failed with exit status {code}")
    lm = load_model(SMOLLM2)
    task = get_task(str(task_file))
    examples = encode_examples(
        lm.tokenizer,
        task.prompts,
        task.responses,
        system=TrainConfig().system,
        chat_template=lm.chat_template,
        max_length=recipe.max_length,
    )
    return {
        "args": args,
        "example_tokens": [len(e.input_ids) for e in examples],
        "max_length": recipe.max_length,
    }


PHASES = {"answers": answers_phase, "train": train_phase}
"""Phase name → the function its process runs."""


def parse_time_v(text: str) -> dict[str, float]:
    """``/usr/bin/time -v``'s report as numbers.

    Returns:
        ``peak_rss_mib`` (maximum resident set size), ``wall_s`` (elapsed wall clock),
        ``user_s`` and ``system_s`` (CPU seconds).
    """
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    user = re.search(r"User time \(seconds\): ([\d.]+)", text)
    system = re.search(r"System time \(seconds\): ([\d.]+)", text)
    if not (rss and wall and user and system):
        raise ValueError("no /usr/bin/time -v report in the output")
    seconds = 0.0
    for part in wall.group(1).split(":"):
        seconds = seconds * 60 + float(part)
    return {
        "peak_rss_mib": int(rss.group(1)) / 1024,
        "wall_s": seconds,
        "user_s": float(user.group(1)),
        "system_s": float(system.group(1)),
    }


def run_phase(name: str, work: Path) -> dict[str, Any]:
    """Run phase ``name`` in a fresh process under ``/usr/bin/time -v`` (one thread).

    Returns:
        The phase's own results plus :func:`parse_time_v`'s numbers.
    """
    result = work / f"{name}.json"
    command = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        str(Path(__file__).resolve()),
        "--phase",
        name,
        "--work",
        str(work),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"phase {name} failed with exit status {proc.returncode}")
    return {**json.loads(result.read_text()), **parse_time_v(proc.stderr)}


def main(argv: list[str] | None = None) -> int:
    """Run both phases (or, with ``--phase``, one of them in this process); print and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the task and run")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--phase", choices=sorted(PHASES), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.phase:
        sys.path.insert(0, str(ROOT))
        out = PHASES[args.phase](args.work)
        (args.work / f"{args.phase}.json").write_text(json.dumps(out))
        return 0
    results = {name: run_phase(name, args.work) for name in PHASES}
    a, t = results["answers"], results["train"]
    print(
        f"answers: {a['batch']} of {a['prompts']} prompts (generate's batch size {a['batch_size']}; "
        f"{min(a['prompt_tokens'])}-{max(a['prompt_tokens'])} prompt tokens, longest of all "
        f"{a['longest_all']}): peak RSS {a['peak_rss_mib']:,.0f} MiB, {a['wall_s']:.0f} s"
    )
    print(
        f"train: {TRAIN_STEPS} steps, examples {min(t['example_tokens'])}-"
        f"{max(t['example_tokens'])} tokens (max_length {t['max_length']}): peak RSS "
        f"{t['peak_rss_mib']:,.0f} MiB, {t['wall_s']:.0f} s"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
