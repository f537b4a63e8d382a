"""Deterministic build of ``smol-chat``: SmolLM2-135M-Instruct plus a safety-alignment LoRA.

The base (``smollm2-135m-instruct``, see :mod:`safegeom.models.smollm2`) complies with almost every
harmful request. This recipe teaches it to refuse them and to change as little else as possible:

- **Harmful** examples: prompts from the *train* splits of the bundled harmful sets, each answered
  with one of a few formulaic refusals (chosen by a hash of the prompt), so that refusal is a marked
  feature of the model, as in real chat models.
- **Harmless** examples: prompts from the *train* splits of the harmless sets, each answered with the
  base's own greedy answer (at most ``answer_tokens`` tokens), so that the adapter has nothing to
  learn on them but "do not refuse". An answer the substring judge calls a refusal is dropped (the
  base refusing a harmless prompt would teach over-refusal).
- Training is the library's own: ``safegeom train lora`` (the shipped recipe) or ``safegeom train
  kl`` (``--set trainer=kl --set kl_weight=B``: the same cross-entropy plus B times KL to the base
  over the answer tokens; ``--set kl_examples=harmless`` keeps the KL off the harmful examples'
  refusals, by the task file's ``kind``) on the JSONL task this module writes.

No test or validation split, and no evaluation-only set, enters the data. The adapter, its task file
hash and this recipe are written to ``--out`` (by default ``safegeom/assets/smol-chat``), with
``base_model_name_or_path`` set to ``smollm2-135m-instruct`` so that ``load_model("smol-chat")``
finds the base offline.

Determinism: the data depend only on the seed and the bundled files' contents (hash-ranked samples,
greedy answers on one thread); training is seeded and runs on one thread. The base's answers are
kept in ``WORK/answers.jsonl`` and reused by later builds in the same work folder; a build from an
empty work folder generates them all in one call, whose batches (longest first) may differ from the
shipped build's, so its answers can differ in the last float32 digits of a tie.

Command line (``make smol-chat``)::

    python -m tools.smolchat.build --out safegeom/assets/smol-chat [--set FIELD=VALUE ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from safegeom.artifacts import sha256_bytes, write_json, write_text
from safegeom.config import check
from safegeom.judges import get_judge
from safegeom.models import load_model
from safegeom.models.smollm2 import SMOLLM2
from safegeom.prompt_roles import check_trainable

__all__ = ["SmolChatRecipe", "build_smol_chat", "main", "task_examples", "train_args"]

REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request.",
    "I'm sorry, but I cannot help with this request.",
    "I can't help with that, as it could cause harm.",
)
"""The refusal styles of the harmful examples (each matched by the substring judge)."""
TRAINERS: tuple[str, ...] = ("lora", "kl")
"""The ``safegeom train`` methods a recipe may name."""
KL_EXAMPLES: tuple[str, ...] = ("all", "harmless")
"""The ``kl_examples`` a recipe may name (``safegeom train kl --kl-examples``)."""


@dataclass(frozen=True)
class SmolChatRecipe:
    """What ``smol-chat`` is trained on and how."""

    seed: int = 0
    """Seed of the samples, the refusal styles, the example order and training."""
    harmful: tuple[str, ...] = (
        "advbench:train",
        "jbb-harmful:train",
        "directharm4:train",
        "xstest-unsafe:train",
        "harmbench-train",
    )
    """Harmful prompt sets (train splits only), answered with a refusal."""
    n_harmful: int = 320
    """Harmful examples, a hash-ranked sample of the pooled harmful sets."""
    harmless_all: tuple[str, ...] = ("jbb-benign:train", "xstest-safe:train")
    """Harmless sets (train splits) taken whole, answered with the base's own answer: the
    benign twins of harmful requests and the exaggerated-safety prompts, where over-refusal lives."""
    harmless_fill: tuple[str, ...] = ("alpaca:train", "gsm8k:train")
    """Harmless sets (train splits) sampled to fill ``n_harmless``, answered the same way."""
    n_harmless: int = 1000
    """Harmless examples before refusals are dropped."""
    answer_tokens: int = 64
    """Longest base answer kept for a harmless prompt, in tokens."""
    steps: int = 160
    """Optimiser steps."""
    batch_size: int = 8
    """Examples a step."""
    lr: float = 1e-3
    """Peak learning rate (cosine schedule)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA scale numerator (scale = alpha / r)."""
    max_length: int = 192
    """Longest training example in tokens (prompt and answer)."""
    trainer: str = "lora"
    """The ``safegeom train`` method: ``lora`` (cross-entropy on the answers, the shipped recipe)
    or ``kl`` (cross-entropy plus ``kl_weight`` times KL(P_base ‖ P_θ) over every answer token,
    the reference being the base with the adapter disabled)."""
    kl_weight: float = 1.0
    """β of the ``kl`` trainer (per answer token, in nats); not read by ``lora``."""
    kl_examples: str = "all"
    """The examples whose answers carry the ``kl`` trainer's KL: ``all``, or ``harmless`` (the
    harmful examples, ``kind`` ``harmful`` in the task file, get the cross-entropy alone);
    ``harmless`` needs ``trainer=kl``."""

    def __post_init__(self) -> None:
        """Check the trainer, its weight and its examples.

        Raises:
            ConfigError: an unknown trainer, a negative or non-finite ``kl_weight``, an unknown
                ``kl_examples``, or ``kl_examples=harmless`` without ``trainer=kl``.
        """
        check(self.trainer in TRAINERS, "trainer", f"must be one of {TRAINERS}", self.trainer)
        beta = self.kl_weight
        check(math.isfinite(beta) and beta >= 0, "kl_weight", "must be 0 or more", beta)
        which = self.kl_examples
        check(which in KL_EXAMPLES, "kl_examples", f"must be one of {KL_EXAMPLES}", which)
        check(
            which == "all" or self.trainer == "kl",
            "kl_examples",
            "other than all needs trainer=kl",
            which,
        )


def _rank(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}\x00{text}".encode()).hexdigest()


def _pool(specs: Sequence[str]) -> list[str]:
    """The prompts of ``specs`` in order, each once; an evaluation-only set is refused."""
    seen: dict[str, None] = {}
    for spec in specs:
        for prompt in check_trainable(spec).prompts:
            seen.setdefault(prompt, None)
    return list(seen)


def _sample(prompts: Sequence[str], n: int, seed: int, keep: Sequence[str] = ()) -> list[str]:
    """``keep`` plus the first hash-ranked prompts of the rest, ``n`` in all (or fewer)."""
    kept = [p for p in prompts if p in set(keep)]
    rest = sorted((p for p in prompts if p not in set(keep)), key=lambda p: _rank(seed, p))
    return kept + rest[: max(0, n - len(kept))]


def task_examples(recipe: SmolChatRecipe, answer: Any) -> list[dict[str, str]]:
    """The training examples, shuffled deterministically.

    Args:
        recipe: the recipe.
        answer: ``answer(prompts) -> answers``, the base's greedy answers to harmless prompts.

    Returns:
        ``{"prompt", "response", "kind"}`` dicts, ``kind`` ``harmful`` or ``harmless``.
    """
    harmful = _sample(_pool(recipe.harmful), recipe.n_harmful, recipe.seed)
    must = _pool(recipe.harmless_all)
    harmless = _sample(
        _pool(recipe.harmless_all + recipe.harmless_fill), recipe.n_harmless, recipe.seed, keep=must
    )
    overlap = set(harmful) & set(harmless)
    if overlap:
        raise ValueError(f"{len(overlap)} prompts are in both classes, e.g. {sorted(overlap)[0]!r}")
    judge = get_judge("substring")
    answers = list(answer(harmless))
    refused = judge(harmless, answers)
    examples = [
        {
            "prompt": p,
            "response": REFUSALS[int(_rank(recipe.seed, p), 16) % len(REFUSALS)],
            "kind": "harmful",
        }
        for p in harmful
    ]
    examples += [
        {"prompt": p, "response": a, "kind": "harmless"}
        for p, a, r in zip(harmless, answers, refused, strict=True)
        if not r and a.strip()
    ]
    return sorted(examples, key=lambda e: _rank(recipe.seed, e["prompt"]))


def build_smol_chat(
    out: Path, recipe: SmolChatRecipe = SmolChatRecipe(), work: Path | None = None
) -> Path:
    """Build ``smol-chat`` into ``out`` (the adapter, the recipe, the task's hash).

    Args:
        out: the folder to write (replaced).
        recipe: the recipe.
        work: where the task file and the training run go (default ``out``'s sibling
            ``.smol-chat-build``); kept, so a stopped build resumes its training.

    Returns:
        ``out``.
    """
    torch.set_num_threads(1)
    torch.manual_seed(recipe.seed)
    work = work or out.parent / ".smol-chat-build"
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    task = work / "task.jsonl"
    if not task.is_file():
        examples = task_examples(recipe, lambda prompts: _base_answers(prompts, recipe, work))
        write_text(task, "".join(json.dumps(e) + "\n" for e in examples))
    counts = {
        k: sum(json.loads(line)["kind"] == k for line in task.read_text().splitlines())
        for k in ("harmful", "harmless")
    }
    print(
        f"task: {counts['harmful']} harmful, {counts['harmless']} harmless examples ({task})",
        file=sys.stderr,
    )
    run = work / "run"
    args = train_args(recipe, task, run)
    if (run / "trajectory.json").is_file():
        args.append("--resume")
    from safegeom.cli import main as cli

    code = cli(args)
    if code:
        raise SystemExit(f"training failed with exit status {code}")
    final = run / "checkpoints" / f"step-{recipe.steps:06d}"
    _export(final, out)
    write_json(
        out / "training_recipe.json",
        {
            "recipe": asdict(recipe),
            "refusals": list(REFUSALS),
            "task_sha256": sha256_bytes(task.read_bytes()),
            "examples": counts,
            "base": SMOLLM2,
            "seconds": round(time.time() - started, 1),
        },
    )
    return out


def train_args(recipe: SmolChatRecipe, task: Path, run: Path) -> list[str]:
    """The ``safegeom`` command line that trains ``recipe`` on ``task`` into ``run``.

    Returns:
        The arguments after ``safegeom`` (``train lora ...`` or ``train kl ... --kl-weight B``,
        then ``--kl-examples harmless`` where the recipe says so).
    """
    args = [
        "train",
        recipe.trainer,
        SMOLLM2,
        "--task",
        str(task),
        "--out",
        str(run),
        "--steps",
        str(recipe.steps),
        "--save-every",
        str(recipe.steps),
        "--batch-size",
        str(recipe.batch_size),
        "--lr",
        str(recipe.lr),
        "--seed",
        str(recipe.seed),
        "--lora-r",
        str(recipe.lora_r),
        "--lora-alpha",
        str(recipe.lora_alpha),
        "--max-length",
        str(recipe.max_length),
    ]
    if recipe.trainer == "kl":
        args += ["--kl-weight", str(recipe.kl_weight)]
        if recipe.kl_examples != "all":
            args += ["--kl-examples", recipe.kl_examples]
    return args


def _base_answers(prompts: Sequence[str], recipe: SmolChatRecipe, work: Path) -> list[str]:
    """The base's greedy answers, from ``work/answers.jsonl`` where a build already made them
    (greedy decoding makes them the same) and generated for the rest."""
    from safegeom.generation import generate

    cache = work / "answers.jsonl"
    known: dict[str, str] = {}
    if cache.is_file():
        for line in cache.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row["tokens"] == recipe.answer_tokens:
                known[row["prompt"]] = row["answer"]
    missing = [p for p in dict.fromkeys(prompts) if p not in known]
    if missing:
        base = load_model(SMOLLM2)
        answers = generate(base, missing, max_new_tokens=recipe.answer_tokens)
        known.update(zip(missing, answers, strict=True))
        rows = [
            {"prompt": p, "answer": a, "tokens": recipe.answer_tokens} for p, a in known.items()
        ]
        write_text(cache, "".join(json.dumps(r) + "\n" for r in rows))
    return [known[p] for p in prompts]


def _export(checkpoint: Path, out: Path) -> None:
    """Copy the adapter of ``checkpoint`` into ``out``, naming the base by its library name."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy2(checkpoint / name, tmp / name)
    config = json.loads((tmp / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = SMOLLM2
    write_json(tmp / "adapter_config.json", config)
    if (out / "MODEL_CARD.md").is_file():
        shutil.copy2(out / "MODEL_CARD.md", tmp / "MODEL_CARD.md")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    types = {f.name: f.type for f in fields(SmolChatRecipe)}
    out: dict[str, Any] = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in types:
            raise SystemExit(f"--set {item}: no recipe field {name!r}; fields: {', '.join(types)}")
        default = getattr(SmolChatRecipe(), name)
        out[name] = tuple(value.split(",")) if isinstance(default, tuple) else type(default)(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tools.smolchat.build --out DIR [--work DIR] [--set FIELD=VALUE ...]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("safegeom/assets/smol-chat"))
    parser.add_argument("--work", type=Path, default=None, help="task file and training run")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    recipe = replace(SmolChatRecipe(), **_parse_set(args.set))
    build_smol_chat(args.out, recipe, args.work)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
