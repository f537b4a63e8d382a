"""``safegeom sweep``: causal sweeps of carriers against matched random controls.

The options are derived from :class:`~safegeom.sweeps.SweepConfig` (the grid),
:class:`SweepCommand` (the model, carriers, prompt sets and outputs) and
:class:`~safegeom.models.LoadConfig`. Carriers are named ``NAME=PATH`` or by file stem; two
files with the same stem (``a/refusal.safetensors``, ``b/refusal.safetensors``) are named by
their folder too (``a/refusal``, ``b/refusal``), so no carrier is dropped. Under a launcher the
sweep's forward passes and generations are shared out over the ranks; rank 0 alone writes and
prints.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from safegeom.attacks.attack_set import prompt_spec
from safegeom.cli.json_output import emit_json
from safegeom.cli.options import add_config, config_from_args
from safegeom.errors import ConfigError
from safegeom.models import LoadConfig, load_model
from safegeom.outputs import check_file_output, claim_folder, inputs_of
from safegeom.parallel.ranks import is_main, main_only
from safegeom.sweeps import SweepConfig, causal_sweep_result

__all__ = ["SweepCommand", "carrier_names", "register", "run"]


@dataclass(frozen=True)
class SweepCommand:
    """What ``safegeom sweep`` runs on and where its result goes."""

    model: str = field(metadata={"positional": True})
    """tiny-chat, a checkpoint or adapter dir, or a hub id."""
    carrier: tuple[str, ...] = field(metadata={"metavar": "[NAME=]FILE,...", "repeat": True})
    """Carrier file (.safetensors), optionally NAME=FILE; repeat --carrier or give a comma list."""
    harmful: str = field(default="advbench:val", metadata={"metavar": "SPEC"})
    """Harmful prompt set: bundled set[:split], a CSV/JSON/JSONL file, or an attack set's folder."""
    harmless: str = field(default="alpaca:val", metadata={"metavar": "SPEC"})
    """Harmless prompt set: bundled set[:split], a CSV/JSON/JSONL file, or an attack set's folder."""
    out: str | None = field(default=None, metadata={"metavar": "PATH"})
    """Write the table: a .parquet file (with a .json sidecar beside it) or a folder."""
    overwrite: bool = False
    """Replace an output safegeom did not write (a folder: write beside its files, kept)."""
    json: bool = False
    """Print the table as JSON records."""
    progress: bool = True
    """Show progress bars."""


def carrier_names(specs: tuple[str, ...] | list[str]) -> dict[str, Path]:
    """Unique names for carrier specs ``[NAME=]PATH``: the given NAME, else the file stem, else
    (when stems collide) the parent folder and stem, so no two carriers share a name.

    Returns:
        Name → path, in the order given.

    Raises:
        ConfigError: no carrier, or two carriers that would still share a name.
    """
    if not specs:
        raise ConfigError("--carrier needs at least one carrier file")
    pairs: list[tuple[str | None, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        pairs.append((name.strip(), Path(path)) if sep and name.strip() else (None, Path(spec)))
    stems = [p.stem for n, p in pairs if n is None]
    out: dict[str, Path] = {}
    for name, path in pairs:
        if name is None:
            name = path.stem if stems.count(path.stem) == 1 else f"{path.parent.name}/{path.stem}"
        if name in out:
            raise ConfigError(
                f"--carrier: two carriers are both named {name!r} ({out[name]} and {path}); "
                "name them with NAME=FILE"
            )
        out[name] = path
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` subcommand."""
    parser = subparsers.add_parser(
        "sweep",
        help="causal sweep of carriers vs matched random directions",
        description="Grid of layer × strength × carrier for ablation and addition; every cell is "
        "compared with matched random unit directions (same layer, positions, norm). Writes a "
        "tidy Parquet table with a JSON sidecar of config and provenance (--out) and prints a "
        "summary.",
    )
    add_config(parser, SweepCommand, title="what to sweep")
    add_config(parser, SweepConfig, title="sweep grid")
    add_config(parser, LoadConfig, title="model loading")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``safegeom sweep``.

    Returns:
        The exit status (0).
    """
    command = config_from_args(SweepCommand, args)
    config = config_from_args(SweepConfig, args)
    load = config_from_args(LoadConfig, args)
    if not command.out:
        return _sweep(command, config, load)
    # before any work; under a launcher rank 0 alone checks, writes and prints
    inputs = inputs_of(command, config, load)
    if command.out.endswith((".parquet", ".json")):  # the table and its sidecar
        out = Path(command.out)
        main_only(check_file_output)(
            out.with_suffix(".parquet"),
            inputs=inputs,
            overwrite=command.overwrite,
            sidecars=[out.with_suffix(".json")],
        )
        return _sweep(command, config, load)
    with claim_folder(command.out, command="sweep", overwrite=command.overwrite, inputs=inputs):
        return _sweep(command, config, load)


def _sweep(command: SweepCommand, config: SweepConfig, load: LoadConfig) -> int:
    """Run the sweep, write ``--out`` (checked by the caller) and print; returns 0."""
    from safegeom.carriers import load_carrier

    paths = carrier_names(command.carrier)
    # bad prompt specs fail before the model loads; an attack set's folder keeps its token ids
    harmful, harmless = prompt_spec(command.harmful), prompt_spec(command.harmless)
    lm = load_model(command.model, load)
    carriers = {
        name: load_carrier(path, d_model=lm.d_model, weight_hash=lm.weight_hash)
        for name, path in paths.items()
    }
    result = causal_sweep_result(lm, carriers, harmful, harmless, config, progress=command.progress)
    table = result.table
    written = main_only(result.save)(command.out) if command.out else None
    if not is_main():
        return 0
    if command.json:
        emit_json(table.to_dict("records"))
    else:
        cols = ["carrier", "op", "layer", "strength", "population", "metric", "effect"]
        cols += ["control_mean", "effect_minus_control", "ci_low", "ci_high"]
        print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        if written is not None:
            print(f"wrote {written} and {written.with_suffix('.json')}")
    return 0
