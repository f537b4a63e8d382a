"""``safegeom evaluate``: generate, judge and score a prompt set (refusal rate, ASR, refusal score).

Interventions: :func:`run` takes an optional ``intervention`` (a context manager, or a
zero-argument callable returning one) entered around generation and scoring. When none is passed,
:func:`build_intervention` turns ``--carrier FILE --intervene ablate|add`` into one: ablation of the
carrier's span at every block input and attention/MLP output, or addition of ``--coeff`` times the
carrier at its layer (or ``--layer``).
"""

from __future__ import annotations

import argparse
from typing import Any

from safegeom.bootstrap import Metric
from safegeom.results import EvalResult
from safegeom.cli import CliError
from safegeom.cli.common import (
    add_model_args,
    add_prompt_args,
    emit_json,
    model_from_args,
    prompts_from_args,
)
from safegeom.evaluate import Intervention, evaluate
from safegeom.judges import get_judge
from safegeom.models import LoadedModel

__all__ = ["add_intervention_args", "build_intervention", "format_table", "register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` subcommand."""
    parser = subparsers.add_parser(
        "evaluate",
        help="refusal rate, ASR and refusal score of a model on a prompt set",
        description="Greedy generation on chat-formatted prompts, judged for refusal, plus the "
        "refusal score (last-position log-odds of refusal tokens); every number comes with a "
        "95% bootstrap CI and names its judge.",
    )
    add_model_args(parser)
    add_prompt_args(parser)
    parser.add_argument(
        "--judge",
        default="substring",
        help="substring (default), xstest, hf-classifier:PATH[#REFUSED_LABEL] or chat-judge:PATH",
    )
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens per completion")
    parser.add_argument("--batch-size", type=int, default=None, help="default: from memory")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--no-score", action="store_true", help="skip the refusal score")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", default=None, metavar="FILE", help="write the result as JSON")
    add_intervention_args(parser)
    parser.set_defaults(func=run)


def add_intervention_args(parser: argparse.ArgumentParser) -> None:
    """``--carrier FILE --intervene ablate|add`` (+ ``--coeff``, ``--layer``, ``--positions``)."""
    parser.add_argument("--carrier", default=None, help="carrier file (.safetensors)")
    parser.add_argument(
        "--intervene",
        choices=["ablate", "add"],
        default=None,
        help="ablate the carrier everywhere, or add it at its layer",
    )
    parser.add_argument("--coeff", type=float, default=1.0, help="addition coefficient")
    parser.add_argument("--layer", default=None, help="addition layer(s) (default: the carrier's)")
    parser.add_argument(
        "--add-positions",
        default="all",
        choices=["all", "prompt", "instruction"],
        help="where the addition applies",
    )


def build_intervention(args: argparse.Namespace, lm: LoadedModel) -> Intervention:
    """The intervention the command line asks for, or ``None``.

    Raises:
        CliError: ``--intervene`` without ``--carrier`` or the other way round.
    """
    if (args.carrier is None) != (args.intervene is None):
        raise CliError("--carrier and --intervene go together")
    if args.carrier is None:
        return None
    from safegeom.carriers import load_carrier
    from safegeom.interventions import ablate, add

    carrier = load_carrier(args.carrier, d_model=lm.d_model, weight_hash=lm.weight_hash)
    if args.intervene == "ablate":
        return lambda: ablate(lm, carrier.vectors.T)
    layers = args.layer if args.layer is not None else carrier.layer
    return lambda: add(
        lm, carrier.direction, layers=layers, coeff=args.coeff, positions=args.add_positions
    )


def _check(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.batch_size is not None and args.batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise CliError(f"--limit must be at least 1, got {args.limit}")


def run(args: argparse.Namespace, *, intervention: Intervention = None) -> int:
    """Execute ``safegeom evaluate``; ``intervention`` overrides :func:`build_intervention`."""
    _check(args)
    prompts = prompts_from_args(args)  # bad prompt specs and judges fail before the model loads
    judge = get_judge(args.judge)
    lm = model_from_args(args)
    if intervention is None:
        intervention = build_intervention(args, lm)
    result = evaluate(
        lm,
        prompts,
        judge=judge,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        system=args.system,
        intervention=intervention,
        score=not args.no_score,
        progress=not args.no_progress,
        seed=args.seed,
    )
    if args.out:
        result.save(args.out)
    if args.json:
        emit_json(result.to_dict())
    else:
        print(format_table(result))
        if args.out:
            print(f"wrote {args.out}")
    return 0


def _row(metric: Metric | None, name: str) -> str:
    if metric is None:
        return f"{name:<20}{'--':>9}"
    ci = f"[{metric.ci_low:.3f}, {metric.ci_high:.3f}]"
    return f"{name:<20}{metric.value:>9.3f}   {ci}"


def format_table(result: EvalResult) -> str:
    """A short human-readable table of the headline metrics."""
    prov: dict[str, Any] = dict(result.provenance)
    confidence = result.refusal_rate.detail.get("confidence", 0.95)
    lines = [
        f"model {prov.get('model', '?')}  prompts {prov.get('prompt_set', '?')} (n={result.n})  "
        f"judge {result.judge}",
        f"{'metric':<20}{'value':>9}   {round(100 * confidence)}% CI",
        _row(result.refusal_rate, "refusal_rate"),
        _row(result.asr, "asr"),
        _row(result.mean_refusal_score, "mean_refusal_score"),
    ]
    return "\n".join(lines)
