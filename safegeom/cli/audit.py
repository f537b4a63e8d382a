"""``safegeom audit``: the checkpoint-trajectory audit, one tidy table per trajectory.

The options are derived from :class:`AuditCommand` (inputs and outputs),
:class:`~safegeom.audit.config.AuditConfig` (what is measured) and
:class:`~safegeom.models.LoadConfig` (how every model is loaded). Inputs and ``--out`` are
checked before any model loads; rerunning the same command continues an interrupted audit.

Under a launcher (``accelerate launch --num_processes N -m safegeom.cli audit ...``) the
checkpoints are dealt across the ranks (:mod:`safegeom.audit.runner`); rank 0 alone checks
``--out``, writes and prints, and the table is the one one process writes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from safegeom.artifacts import check_output_dir
from safegeom.audit.config import AuditConfig
from safegeom.audit.runner import audit
from safegeom.audit.schema import BASE_ANCHOR
from safegeom.cli.json_output import emit_json
from safegeom.cli.options import add_config, config_from_args
from safegeom.models.loading import LoadConfig
from safegeom.parallel.ranks import is_main, main_only

__all__ = ["INTERRUPT_HINT", "AuditCommand", "register", "run"]

INTERRUPT_HINT = "interrupted; rerun the same command to continue the audit"
"""What the command prints on Ctrl-C (finished checkpoints are kept)."""

_SUMMARY = ("asr", "attack_asr", "over_refusal", "cosine_to_base", "hr_coupling", "ablation_effect")


@dataclass(frozen=True)
class AuditCommand:
    """What ``safegeom audit`` runs on and where the audit goes."""

    paths: tuple[str, ...] = field(metadata={"positional": True, "metavar": "PATH"})
    """A run folder, a Trainer output folder (checkpoint-N/), or BASE CKPT [CKPT ...]."""
    out: str = field(metadata={"metavar": "DIR"})
    """Audit folder (audit.parquet, manifest.json, reference/); checked before any work."""
    base: str | None = field(default=None, metadata={"metavar": "MODEL"})
    """The aligned base model, when the inputs do not name it (then every PATH is a checkpoint)."""
    overwrite: bool = False
    """Replace an audit in --out made with other settings."""
    json: bool = False
    """Print the table as JSON records."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", tuple(self.paths))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``audit`` subcommand."""
    parser = subparsers.add_parser(
        "audit",
        help="audit a fine-tuning trajectory against its base (carriers, drift, causal, behaviour)",
        description="For the base and every checkpoint: refusal and harmfulness carriers, drift "
        "from the base, H/R coupling, fixed-source causal tests against matched random controls, "
        "and behaviour. Writes DIR/audit.parquet (tidy), DIR/manifest.json and the base's "
        "carriers in DIR/reference/; rerun the same command to continue an interrupted audit.",
    )
    add_config(parser, AuditCommand, title="audit")
    add_config(parser, AuditConfig, title="what to measure")
    add_config(parser, LoadConfig, title="model loading")
    parser.set_defaults(func=run, interrupt_hint=INTERRUPT_HINT)


def run(args: argparse.Namespace) -> int:
    """Execute ``safegeom audit``: check ``--out`` and the inputs, run, summarise; returns 0."""
    command = config_from_args(AuditCommand, args)
    config = config_from_args(AuditConfig, args)
    load = config_from_args(LoadConfig, args)
    # under a launcher rank 0 alone checks and writes (safegeom.parallel.ranks); the others print nothing
    main_only(check_output_dir)(command.out)
    result = audit(
        list(command.paths),
        command.out,
        config,
        load=load,
        base=command.base,
        overwrite=command.overwrite,
        progress=command.progress,
    )
    if not is_main():
        return 0
    table = result.table
    if command.json:
        emit_json(table.astype(object).where(table.notna(), None).to_dict("records"))
        return 0
    print(f"wrote {result.root}/audit.parquet ({len(table)} rows) and {result.root}/manifest.json")
    floor = table["source"].eq("floor").fillna(False).astype(bool)
    other = table["anchor"].ne(BASE_ANCHOR).fillna(False).astype(bool)  # anchors: in the table
    shown = table[table["metric"].isin(_SUMMARY) & ~floor & ~other]
    if not shown.empty:
        summary = shown.groupby(["step", "checkpoint", "metric"], sort=True)["value"].mean()
        print(
            "means over layers, carriers and sources, noise floors left out"
            + (", against the base alone" if other.any() else "")
            + " (the full table is in audit.parquet):"
        )
        print(summary.unstack("metric").to_string(float_format=lambda v: f"{v:.3f}"))
    return 0
