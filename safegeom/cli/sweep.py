"""``safegeom sweep``: causal sweeps of carriers against matched random controls."""

from __future__ import annotations

import argparse
from pathlib import Path

from safegeom.carriers import load_carrier
from safegeom.cli.common import add_model_args, emit_json, model_from_args
from safegeom.sweeps import SweepConfig, causal_sweep


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` subcommand."""
    parser = subparsers.add_parser(
        "sweep",
        help="causal sweep of carriers vs matched random directions",
        description="Grid of layer × strength × carrier for ablation and addition; every cell is "
        "compared with matched random unit directions (same layer, positions, norm). Writes a "
        "tidy Parquet table (--out) and prints a summary.",
    )
    add_model_args(parser)
    parser.add_argument("--carrier", action="append", required=True, help="carrier file (repeat)")
    parser.add_argument("--harmful", default="advbench:val", help="harmful prompt SPEC")
    parser.add_argument("--harmless", default="alpaca:val", help="harmless prompt SPEC")
    parser.add_argument("--ops", default="ablate,add", help="ablate and/or add")
    parser.add_argument("--add-layers", default="all", help="layer spec for addition")
    parser.add_argument("--strengths", default="-2,-1,-0.5,0.5,1,2", help="addition multiples")
    parser.add_argument("--ablate-layers", default="all", help="';'-separated layer specs")
    parser.add_argument("--n-random", type=int, default=20, help="random controls per cell")
    parser.add_argument("--n-prompts", type=int, default=32, help="prompts per population")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generate", action="store_true", help="also generate and judge")
    parser.add_argument("--out", default=None, help="Parquet file for the table")
    parser.add_argument("--json", action="store_true", help="print the table as JSON records")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``safegeom sweep``."""
    lm = model_from_args(args)
    carriers = {
        Path(p).stem: load_carrier(p, d_model=lm.d_model, weight_hash=lm.weight_hash)
        for p in args.carrier
    }
    config = SweepConfig(
        ops=tuple(s.strip() for s in args.ops.split(",") if s.strip()),
        add_layers=args.add_layers,
        add_strengths=_floats(args.strengths),
        ablate_layers=tuple(s.strip() for s in args.ablate_layers.split(";") if s.strip()),
        n_random=args.n_random,
        n_prompts=args.n_prompts,
        seed=args.seed,
        generate=args.generate,
    )
    table = causal_sweep(lm, carriers, args.harmful, args.harmless, config)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_parquet(args.out, index=False)
    if args.json:
        emit_json(table.to_dict("records"))
    else:
        cols = ["carrier", "op", "layer", "strength", "population", "metric", "effect"]
        cols += ["control_mean", "effect_minus_control", "ci_low", "ci_high"]
        print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0
