"""``safegeom capture``: activations at sites × layers × positions, to a file."""

from __future__ import annotations

import argparse

from safegeom.capture import capture, capture_stats, capture_to_disk
from safegeom.cli.common import (
    add_model_args,
    add_prompt_args,
    emit_json,
    model_from_args,
    prompts_from_args,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``capture`` subcommand."""
    parser = subparsers.add_parser(
        "capture",
        help="capture activations to safetensors",
        description="Capture activations at (site, layer, position) with a progress bar; writes "
        "FILE (safetensors) and FILE.json (provenance), a sharded folder (--shard-size), or "
        "float64 means/covariances (--stats).",
    )
    add_model_args(parser)
    add_prompt_args(parser)
    parser.add_argument(
        "--sites", default="resid_pre", help="resid_pre,resid_post,attn_out,mlp_out"
    )
    parser.add_argument("--layers", default="all", help="all, 5, -1, 2:6, 2-5 or comma lists")
    parser.add_argument("--positions", default="t_post", help="t_inst, t_post, last or offsets")
    parser.add_argument("--out", required=True, help="output file (or folder with --shard-size)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--backend", default="hooks", choices=["hooks", "lens"])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--shard-size", type=int, default=None, help="stream to a sharded folder")
    mode.add_argument("--stats", action="store_true", help="float64 means (and --covariance)")
    parser.add_argument("--covariance", action="store_true", help="with --stats")
    parser.add_argument("--json", action="store_true", help="print a summary as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``safegeom capture``."""
    lm = model_from_args(args)
    prompts = prompts_from_args(args)
    common = dict(
        sites=args.sites,
        layers=args.layers,
        positions=args.positions,
        batch_size=args.batch_size,
        system=args.system,
    )
    if args.shard_size:
        path = capture_to_disk(lm, prompts, args.out, shard_size=args.shard_size, **common)
        summary = {"out": str(path), "mode": "shards"}
    elif args.stats:
        stats = capture_stats(
            lm, prompts, covariance=args.covariance, backend=args.backend, **common
        )
        paths = {site: str(m.save(f"{args.out}.{site}")) for site, m in stats.moments.items()}
        summary = {"out": paths, "mode": "stats", "layers": list(stats.layers)}
    else:
        acts = capture(lm, prompts, backend=args.backend, **common)
        path = acts.save(args.out)
        summary = {
            "out": str(path),
            "mode": "tensors",
            "shape": {s: list(t.shape) for s, t in acts.data.items()},
            "positions": list(acts.positions),
            "layers": list(acts.layers),
        }
    if args.json:
        emit_json(summary)
    else:
        print(f"wrote {summary['out']}")
    return 0
