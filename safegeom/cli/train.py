"""``safegeom train sft|lora``: fine-tune a model on a task and save a checkpoint trajectory."""

from __future__ import annotations

import argparse

from safegeom.cli.common import emit_json
from safegeom.train.runner import DEFAULT_LR, train
from safegeom.train.tasks import TASK_HELP, get_task

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand (methods ``sft`` and ``lora``)."""
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a model and save a checkpoint trajectory",
        description="Fine-tune MODEL on a task (loss on response tokens only) under accelerate; "
        "saves DIR/checkpoints/step-NNNNNN/ every --save-every steps (step 0 included), each "
        "loadable as a MODEL, and the manifest DIR/trajectory.json.",
    )
    parser.add_argument("method", choices=["sft", "lora"], help="full fine-tuning or LoRA")
    parser.add_argument(
        "model", metavar="MODEL", help="tiny-chat, a checkpoint or adapter dir, or a hub id"
    )
    parser.add_argument("--task", required=True, metavar="SPEC", help=TASK_HELP)
    parser.add_argument("--prompt-field", default="prompt", help="prompt field of a JSONL task")
    parser.add_argument(
        "--response-field", default="response", help="response field of a JSONL task"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="run folder")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    parser.add_argument("--save-every", type=int, default=25, help="checkpoint interval")
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"peak learning rate (default sft {DEFAULT_LR['sft']}, lora {DEFAULT_LR['lora']})",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step and process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-length", type=int, default=None, help="truncate conversations")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument(
        "--lora-targets",
        default=None,
        help="comma-separated module names (default: every attention and MLP projection)",
    )
    parser.add_argument("--dtype", default="float32", help="training dtype of the weights")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in DIR")
    mode.add_argument("--overwrite", action="store_true", help="replace the run in DIR")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``safegeom train``; returns the exit status."""
    task = get_task(args.task, prompt_field=args.prompt_field, response_field=args.response_field)
    targets = (
        [t.strip() for t in args.lora_targets.split(",") if t.strip()]
        if args.lora_targets
        else None
    )
    trajectory = train(
        args.model,
        task,
        method=args.method,
        out=args.out,
        steps=args.steps,
        save_every=args.save_every,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_targets=targets,
        schedule=args.schedule,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_length=args.max_length,
        system=args.system,
        resume=args.resume,
        overwrite=args.overwrite,
        dtype=args.dtype,
        progress=not args.no_progress,
    )
    if args.json:
        emit_json(trajectory.to_dict())
    else:
        last = trajectory.last
        print(f"wrote {len(trajectory.checkpoints)} checkpoints to {trajectory.root} "
              f"(step {last.step}, loss {last.loss:.4f})")  # fmt: skip
    return 0
