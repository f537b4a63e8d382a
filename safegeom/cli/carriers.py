"""``safegeom carriers``: refusal direction, harmfulness direction and refusal cone of a model."""

from __future__ import annotations

import argparse

from safegeom.carriers import SelectionConfig
from safegeom.carriers.suite import extract_carriers
from safegeom.cli.common import add_model_args, emit_json, model_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``carriers`` subcommand."""
    parser = subparsers.add_parser(
        "carriers",
        help="extract refusal/harmfulness carriers",
        description="Diff-in-means refusal direction at t_post with bypass/induce/KL selection "
        "(Arditi et al.), harmfulness direction at t_inst, cheap refusal cone; writes carriers "
        "(safetensors + JSON), candidates.parquet and summary.json into --out.",
    )
    add_model_args(parser)
    parser.add_argument("--harmful", default="advbench:train", help="harmful prompt SPEC")
    parser.add_argument("--harmless", default="alpaca:train", help="harmless prompt SPEC")
    parser.add_argument("--harmful-val", default="advbench:val", help="harmful validation SPEC")
    parser.add_argument("--harmless-val", default="alpaca:val", help="harmless validation SPEC")
    parser.add_argument("--n-train", type=int, default=128, help="prompts per class for means")
    parser.add_argument("--n-val", type=int, default=32, help="prompts per class for selection")
    parser.add_argument("--max-kl", type=float, default=0.1, help="KL filter (nats)")
    parser.add_argument("--max-layer-fraction", type=float, default=0.8)
    parser.add_argument(
        "--min-induce", type=float, default=0.0, help="induce-score filter (refusal log-odds)"
    )
    parser.add_argument("--no-filter", action="store_true", help="skip the refusal-score filter")
    parser.add_argument("--cone-k", type=int, default=3, help="cone dimension (0: no cone)")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--json", action="store_true", help="print summary.json to stdout")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``safegeom carriers``."""
    lm = model_from_args(args)
    config = SelectionConfig(
        n_train=args.n_train,
        n_val=args.n_val,
        max_kl=args.max_kl,
        max_layer_fraction=args.max_layer_fraction,
        min_induce=args.min_induce,
        filter_train=not args.no_filter,
        system=args.system,
    )
    suite = extract_carriers(
        lm, args.harmful, args.harmless, args.harmful_val, args.harmless_val, config,
        cone_k=args.cone_k,
    )  # fmt: skip
    suite.save(args.out)
    summary = suite.summary()
    if args.json:
        emit_json(summary)
    else:
        r = summary["refusal"]
        print(
            f"refusal direction: layer {r['layer']} {r['position']}  bypass {r['bypass']:.3f}  "
            f"induce {r['induce']:.3f}  KL {r['kl']:.4f}\n"
            f"H/R coupling |cos| {summary['hr_coupling']:.3f}\nwrote {args.out}"
        )
    return 0
