"""``safegeom demo``: behaviour, carriers, ablation check and a harmful LoRA trajectory on tiny-chat."""

from __future__ import annotations

import argparse

from safegeom.cli.common import emit_json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    parser = subparsers.add_parser(
        "demo",
        help="the whole story on tiny-chat, in a few minutes on CPU",
        description="Behaviour of tiny-chat on held-out prompts, its refusal and harmfulness "
        "carriers, an ablation check against matched random directions, and a harmful LoRA "
        "fine-tuning trajectory; writes report.md, summary.json and tables into --out.",
    )
    parser.add_argument("--out", default="runs/demo", help="run folder (outside the package)")
    parser.add_argument("--model", default="tiny-chat", help="MODEL (default: tiny-chat)")
    parser.add_argument("--n-eval", type=int, default=32, help="prompts per behaviour set")
    parser.add_argument("--lora-steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print summary.json to stdout")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``safegeom demo``."""
    from safegeom.demo import DemoConfig, run_demo

    config = DemoConfig(
        model=args.model, n_eval=args.n_eval, lora_steps=args.lora_steps, seed=args.seed
    )
    summary = run_demo(args.out, config, echo=not args.json)
    if args.json:
        emit_json(summary)
    return 0
