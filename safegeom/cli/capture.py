"""``safegeom capture``: activations at sites × layers × positions, to a file."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safegeom.activations import CaptureConfig, capture, capture_stats, capture_to_disk
from safegeom.activations.values import Activations, ActivationStats
from safegeom.attacks.attack_set import AttackSet, prompt_spec
from safegeom.cli.json_output import emit_json
from safegeom.cli.options import add_config, config_from_args
from safegeom.config import check
from safegeom.errors import ConfigError, SafegeomError
from safegeom.models.loading import LoadConfig, load_model
from safegeom.outputs import check_file_output, claim_folder, inputs_of
from safegeom.parallel.ranks import is_main, main_only
from safegeom.prompts import PromptSet


@dataclass(frozen=True)
class CaptureCommand:
    """What to capture from and where the result goes."""

    model: str = field(metadata={"positional": True, "metavar": "MODEL"})
    """tiny-chat, a checkpoint or adapter folder, or a hub id."""
    prompts: str = field(metadata={"metavar": "SPEC"})
    """Prompt set: a bundled set[:split], a CSV/JSON/JSONL file, or an attack set's folder."""
    out: str = field(metadata={"metavar": "PATH"})
    """Output file (a folder with --shard-size); checked before the model is loaded."""
    overwrite: bool = False
    """Replace an output safegeom did not write (a folder: write beside its files, kept)."""
    column: str | None = None
    """Prompt column of a user file (default: prompt, instruction, goal or question)."""
    limit: int | None = None
    """Use only the first N prompts."""
    json: bool = False
    """Print a summary as JSON."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.limit is not None:
            check(self.limit >= 1, "limit", "must be a positive number of prompts", self.limit)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``capture`` subcommand."""
    parser = subparsers.add_parser(
        "capture",
        help="capture activations to safetensors",
        description="Capture activations at (site, layer, position) with a progress bar; writes "
        "FILE (safetensors) and FILE.json (provenance), a sharded folder (--shard-size), or "
        "one float64 statistics file of means (and covariances) per site (--stats).",
    )
    add_config(parser, CaptureCommand, title="capture")
    add_config(parser, LoadConfig, title="model loading")
    add_config(parser, CaptureConfig, title="what to capture")
    parser.set_defaults(func=run)


def _prompts(command: CaptureCommand) -> PromptSet | AttackSet:
    try:
        return prompt_spec(command.prompts, column=command.column, n=command.limit)
    except SafegeomError:
        raise
    except ValueError as err:  # prompt loading reports bad specs as ValueError
        raise ConfigError(f"--prompts: {err}") from None


def _span(values: tuple[Any, ...] | list[Any]) -> str:
    items = [str(v) for v in values]
    return items[0] if len(items) == 1 else f"{items[0]}..{items[-1]} ({len(items)})"


def run(args: argparse.Namespace) -> int:
    """Execute ``safegeom capture``: check ``--out``, load the prompts and the model, capture."""
    command = config_from_args(CaptureCommand, args)
    config = config_from_args(CaptureConfig, args)
    # under a launcher rank 0 alone checks and writes (safegeom.parallel.ranks); the others print nothing
    inputs = inputs_of(command, config, config_from_args(LoadConfig, args))
    if config.shard_size is not None:
        with claim_folder(
            command.out, command="capture", overwrite=command.overwrite, inputs=inputs
        ):
            return _capture(args, command, config)
    main_only(check_file_output)(
        command.out, inputs=inputs, overwrite=command.overwrite, sidecars=[f"{command.out}.json"]
    )
    return _capture(args, command, config)


def _capture(args: argparse.Namespace, command: CaptureCommand, config: CaptureConfig) -> int:
    """Load the prompts and the model, capture, write ``--out`` (checked by the caller), print;
    returns 0."""
    prompts = _prompts(command)
    lm = load_model(command.model, config_from_args(LoadConfig, args))
    summary: dict[str, Any]
    if config.shard_size is not None:
        path = capture_to_disk(lm, prompts, command.out, config, progress=command.progress)
        summary = {"out": str(path), "mode": "shards"}
        line = f"wrote {path}/ (sharded activations of {len(prompts)} prompts)"
    elif config.stats:
        stats = capture_stats(lm, prompts, config, progress=command.progress)
        path = main_only(stats.save)(command.out) or Path(command.out)
        summary = _stats_summary(stats, str(path))
        line = (
            f"wrote {path} (float64 {'means and covariances' if config.covariance else 'means'}"
            f" of {', '.join(stats.sites)}; layers {_span(stats.layers)}; positions "
            f"{_span(stats.positions)}; n={stats.n}) and {path}.json"
        )
    else:
        acts = capture(lm, prompts, config, progress=command.progress)
        path = main_only(acts.save)(command.out) or Path(command.out)
        summary = _tensor_summary(acts, str(path))
        shape = "x".join(str(s) for s in next(iter(acts.data.values())).shape)
        line = f"wrote {path} ({', '.join(acts.sites)}: {shape}) and {path}.json"
    if not is_main():
        return 0
    if command.json:
        emit_json(summary)
    else:
        print(line)
    return 0


def _tensor_summary(acts: Activations, path: str) -> dict[str, Any]:
    return {
        "out": path,
        "mode": "tensors",
        "shape": {s: list(t.shape) for s, t in acts.data.items()},
        "positions": list(acts.positions),
        "layers": list(acts.layers),
    }


def _stats_summary(stats: ActivationStats, path: str) -> dict[str, Any]:
    return {
        "out": path,
        "mode": "stats",
        "sites": list(stats.sites),
        "layers": list(stats.layers),
        "positions": list(stats.positions),
        "n": stats.n,
        "covariance": all(m.cov is not None for m in stats.moments.values()),
    }
