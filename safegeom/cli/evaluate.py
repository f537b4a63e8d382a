"""``safegeom evaluate``: generate, judge and score a prompt set (refusal rate, ASR, refusal score).

The options are derived from :class:`~safegeom.evaluation.EvaluateConfig` (how to evaluate, the
config of :func:`~safegeom.evaluation.evaluate`), :class:`EvaluateCommand` (what: the model, the
prompts, the outputs), :class:`InterventionOptions` and :class:`~safegeom.models.LoadConfig`.

Interventions: :func:`run` takes an optional ``intervention`` (an intervention value, a context
manager, or a zero-argument callable returning one) entered around generation and scoring. When
none is passed, :func:`build_intervention` turns ``--carrier FILE --intervene ablate|add`` into an
:class:`~safegeom.interventions.Ablation` of the carrier's span at every block input and
attention/MLP output, or an :class:`~safegeom.interventions.Addition` of ``--coeff`` times the
carrier at its layer (or ``--layer``); the result's provenance records its description.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from safegeom.attacks.attack_set import prompt_spec
from safegeom.bootstrap import Metric
from safegeom.cli import CliError
from safegeom.cli.json_output import emit_json
from safegeom.cli.options import add_config, config_from_args
from safegeom.errors import ConfigError
from safegeom.eval_result import EvalResult
from safegeom.evaluation import EvaluateConfig, Intervention, evaluate
from safegeom.judges import get_judge
from safegeom.models import LoadConfig, LoadedModel, load_model
from safegeom.outputs import check_file_output, inputs_of
from safegeom.parallel.ranks import is_main, main_only

__all__ = [
    "EvaluateCommand",
    "InterventionOptions",
    "build_intervention",
    "format_table",
    "register",
    "run",
]


@dataclass(frozen=True)
class InterventionOptions:
    """The intervention ``safegeom evaluate`` builds from ``--carrier`` (see
    :func:`build_intervention`); in Python, pass an intervention value to ``evaluate`` instead."""

    intervene: Literal["ablate", "add"] | None = None
    """Ablate the --carrier everywhere, or add it at its layer."""
    coeff: float = 1.0
    """Addition coefficient, in multiples of the carrier vector."""
    layer: str | None = None
    """Addition layer(s) (default: the carrier's; all, 2:6 end-exclusive, 2-5 inclusive, 1,3)."""
    add_positions: Literal["all", "prompt", "instruction"] = "all"
    """Where the addition applies: every position, the prompt pass, or the instruction tokens."""


@dataclass(frozen=True)
class EvaluateCommand:
    """What ``safegeom evaluate`` runs on and where its result goes."""

    model: str = field(metadata={"positional": True})
    """tiny-chat, a checkpoint or adapter dir, or a hub id."""
    prompts: str = field(metadata={"metavar": "SPEC"})
    """Prompt set: bundled set[:split], a CSV/JSON/JSONL file, or an attack set's folder."""
    column: str | None = None
    """Prompt column of a user file."""
    limit: int | None = None
    """Use the first N prompts."""
    carrier: str | None = None
    """Carrier file (.safetensors) for --intervene."""
    out: str | None = field(default=None, metadata={"metavar": "FILE"})
    """Write the result as JSON to FILE."""
    overwrite: bool = False
    """Replace an existing output file that safegeom did not write."""
    json: bool = False
    """Print the result as JSON."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        """Check ranges, naming the flags.

        Raises:
            ConfigError: ``--limit`` below 1.
        """
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` subcommand."""
    parser = subparsers.add_parser(
        "evaluate",
        help="refusal rate, ASR and refusal score of a model on a prompt set",
        description="Greedy generation on chat-formatted prompts, judged for refusal, plus the "
        "refusal score (last-position log-odds of refusal tokens); every number comes with a "
        "95% bootstrap CI and names its judge.",
    )
    add_config(parser, EvaluateCommand, title="what to evaluate")
    add_config(parser, EvaluateConfig, title="evaluation")
    add_config(parser, InterventionOptions, title="intervention")
    add_config(parser, LoadConfig, title="model loading")
    parser.set_defaults(func=run)


def build_intervention(
    command: EvaluateCommand, config: InterventionOptions, lm: LoadedModel
) -> Intervention:
    """The intervention the command line asks for (an intervention value), or ``None``.

    Raises:
        CliError: ``--intervene`` without ``--carrier`` or the other way round.
    """
    if (command.carrier is None) != (config.intervene is None):
        raise CliError("--carrier and --intervene go together")
    if command.carrier is None:
        return None
    from safegeom.carriers import load_carrier
    from safegeom.interventions import Ablation, Addition

    carrier = load_carrier(command.carrier, d_model=lm.d_model, weight_hash=lm.weight_hash)
    if config.intervene == "ablate":
        return Ablation(carrier)
    return Addition(
        carrier, layers=config.layer, coeff=config.coeff, positions=config.add_positions
    )


def run(args: argparse.Namespace, *, intervention: Intervention = None) -> int:
    """Execute ``safegeom evaluate``; ``intervention`` overrides :func:`build_intervention`.

    Returns:
        The exit status (0).
    """
    command = config_from_args(EvaluateCommand, args)
    config = config_from_args(EvaluateConfig, args)
    options = config_from_args(InterventionOptions, args)
    load = config_from_args(LoadConfig, args)
    if command.out:  # before any work; under a launcher rank 0 alone checks and writes
        main_only(check_file_output)(
            command.out,
            inputs=inputs_of(command, config, options, load),
            overwrite=command.overwrite,
        )
    # bad prompt specs and judges fail before the model loads
    prompts = prompt_spec(command.prompts, column=command.column, n=command.limit)
    config = dataclasses.replace(config, judge=get_judge(config.judge))
    lm = load_model(command.model, load)
    if intervention is None:
        intervention = build_intervention(command, options, lm)
    result = evaluate(lm, prompts, config, intervention=intervention, progress=command.progress)
    if command.out:
        main_only(result.save)(command.out)
    if not is_main():
        return 0
    if command.json:
        emit_json(result.to_dict())
    else:
        print(format_table(result))
        if command.out:
            print(f"wrote {command.out}")
    return 0


def _row(metric: Metric | None, name: str) -> str:
    if metric is None:
        return f"{name:<20}{'--':>9}"
    ci = f"[{metric.ci_low:.3f}, {metric.ci_high:.3f}]"
    return f"{name:<20}{metric.value:>9.3f}   {ci}"


def format_table(result: EvalResult) -> str:
    """A short human-readable table of the headline metrics (and empty completions, if any)."""
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
    if result.n_empty:
        lines.append(
            f"{result.n_empty} of {result.n} completions are empty (counted as not refused)"
        )
    return "\n".join(lines)
