"""Checkpoint trajectories: the ``trajectory.json`` manifest of a fine-tuning run.

A run folder holds::

    DIR/trajectory.json                 the manifest (written atomically, with the user's umask)
    DIR/checkpoints/step-000000/        each loadable with safegeom.models.load_model(path)
    DIR/checkpoints/step-000000/trainer_state/   optimizer, scheduler, RNG and data position
    ...

The manifest holds ``format``, ``base_model`` (the MODEL spec as given), ``base_hash`` (its weight
hash), ``config`` (method, task, task size, seed, lr, batch size, steps, LoRA settings ...),
``checkpoints`` (``{step, loss, path, weight_hash}`` each, ``path`` relative to DIR), ``complete``
and ``versions``. Any trainer that writes this format (SFT, LoRA, RefusalGuard, adaptive) can be read
back with :func:`load_trajectory`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from safegeom.artifacts import read_json, write_json
from safegeom.errors import (
    ArtifactError,
    ConfigError,
    NotFoundError,
    OutputPathError,
    SafegeomError,
)
from safegeom.outputs import remove_written

__all__ = [
    "FORMAT",
    "MANIFEST",
    "TRAINER_STATE",
    "CheckpointRecord",
    "Trajectory",
    "checkpoint_dirname",
    "load_trajectory",
    "prepare_run_dir",
    "write_trajectory",
]

FORMAT = "safegeom.trajectory/1"
"""Format tag written into every manifest."""
MANIFEST = "trajectory.json"
"""File name of the manifest inside a run folder."""
TRAINER_STATE = "trainer_state"
"""Sub-folder of a checkpoint holding what resuming needs (``load_model`` ignores it)."""


def checkpoint_dirname(step: int) -> str:
    """Return the relative folder of the checkpoint at ``step`` (``checkpoints/step-000042``)."""
    return f"checkpoints/step-{step:06d}"


@dataclass(frozen=True)
class CheckpointRecord:
    """One checkpoint of a trajectory.

    Attributes:
        step: Optimizer steps taken before this checkpoint (0: the starting model).
        loss: Mean training loss over the steps since the previous checkpoint; at step 0, the loss
            of the first batch before any update. ``None`` where unknown.
        path: Folder of the checkpoint, relative to the run folder.
        weight_hash: sha256 of the trained weights at save time (full model, PEFT-wrapped model,
            or RefusalGuard edit).
        terms: Mean of each loss term over the same steps as ``loss`` (``task``, ``geom``, ``kl``,
            ``risk``, ``sft_w``, ``kl_w``, as the method has them).
    """

    step: int
    loss: float | None
    path: str
    weight_hash: str | None = None
    terms: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Freeze ``terms``."""
        object.__setattr__(self, "terms", MappingProxyType(dict(self.terms)))

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form of the record."""
        return {
            "step": self.step,
            "loss": self.loss,
            "path": self.path,
            "weight_hash": self.weight_hash,
            "terms": dict(self.terms),
        }


@dataclass(frozen=True)
class Trajectory:
    """A fine-tuning run read from (or about to be written to) its manifest.

    Attributes:
        root: The run folder.
        base_model: The MODEL spec training started from, as given (``tiny-chat``, a path, a hub id).
        base_hash: Weight hash of that starting model.
        config: The run's settings (read-only mapping): ``method``, ``task``, ``task_size``,
            ``seed``, ``lr``, ``batch_size``, ``steps``, ``save_every``, ``lora`` ...
        checkpoints: The checkpoints saved so far, by increasing step (step 0 first).
        complete: Whether the run reached its final step.
        versions: Package versions the run used.
        log: One entry per optimizer step so far: ``{"step", "loss", **terms}`` (the step's own
            values: per-batch risk and weights for adaptive, the penalty for RefusalGuard).
    """

    root: Path
    base_model: str
    base_hash: str
    config: Mapping[str, Any]
    checkpoints: tuple[CheckpointRecord, ...] = ()
    complete: bool = False
    versions: Mapping[str, str] = field(default_factory=dict)
    log: tuple[Mapping[str, float], ...] = ()

    def __post_init__(self) -> None:
        """Freeze the mappings and sort checkpoints by step."""
        object.__setattr__(self, "log", tuple(MappingProxyType(dict(r)) for r in self.log))
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "config", MappingProxyType(dict(self.config)))
        object.__setattr__(self, "versions", MappingProxyType(dict(self.versions)))
        object.__setattr__(
            self, "checkpoints", tuple(sorted(self.checkpoints, key=lambda c: c.step))
        )

    @property
    def method(self) -> str:
        """The training method (``sft``, ``lora``, ...)."""
        return str(self.config.get("method", ""))

    @property
    def steps(self) -> tuple[int, ...]:
        """Steps of the saved checkpoints, increasing."""
        return tuple(c.step for c in self.checkpoints)

    @property
    def paths(self) -> tuple[Path, ...]:
        """Absolute folders of the saved checkpoints, by step; each loads with ``load_model``."""
        return tuple(self.root / c.path for c in self.checkpoints)

    @property
    def losses(self) -> tuple[float | None, ...]:
        """Recorded losses of the saved checkpoints, by step."""
        return tuple(c.loss for c in self.checkpoints)

    @property
    def last(self) -> CheckpointRecord:
        """The latest checkpoint record."""
        if not self.checkpoints:
            raise SafegeomError(f"trajectory in {self.root} has no checkpoints yet")
        return self.checkpoints[-1]

    def path(self, step: int) -> Path:
        """Return the absolute folder of the checkpoint at ``step``."""
        for c in self.checkpoints:
            if c.step == step:
                return self.root / c.path
        raise NotFoundError(
            f"no checkpoint at step {step} in {self.root}; saved steps: {self.steps}"
        )

    def with_checkpoint(self, record: CheckpointRecord, *, complete: bool = False) -> Trajectory:
        """Return a copy with ``record`` added (replacing one at the same step)."""
        kept = tuple(c for c in self.checkpoints if c.step != record.step)
        return Trajectory(
            root=self.root,
            base_model=self.base_model,
            base_hash=self.base_hash,
            config=self.config,
            checkpoints=(*kept, record),
            complete=complete,
            versions=self.versions,
            log=self.log,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form of the manifest."""
        return {
            "format": FORMAT,
            "base_model": self.base_model,
            "base_hash": self.base_hash,
            "config": dict(self.config),
            "checkpoints": [c.to_dict() for c in self.checkpoints],
            "complete": self.complete,
            "versions": dict(self.versions),
            "log": [dict(r) for r in self.log],
        }


def write_trajectory(trajectory: Trajectory) -> Path:
    """Write the manifest of ``trajectory`` atomically to ``root/trajectory.json``.

    Returns:
        The manifest path.
    """
    return write_json(trajectory.root / MANIFEST, trajectory.to_dict())


def load_trajectory(root: str | Path) -> Trajectory:
    """Read the manifest of the run in ``root``.

    Returns:
        The :class:`Trajectory` (checkpoint paths resolved against ``root``).

    Raises:
        NotFoundError: no manifest in ``root``.
        ArtifactError: not a safegeom trajectory manifest.
    """
    folder = Path(root)
    file = folder / MANIFEST
    if not file.is_file():
        raise NotFoundError(f"{folder} holds no training run: {MANIFEST} is missing")
    data = read_json(file, what="safegeom trajectory manifest", format=FORMAT)
    records = tuple(
        CheckpointRecord(
            step=int(c["step"]),
            loss=None if c.get("loss") is None else float(c["loss"]),
            path=str(c["path"]),
            weight_hash=c.get("weight_hash"),
            terms={k: float(v) for k, v in (c.get("terms") or {}).items()},
        )
        for c in data.get("checkpoints", [])
    )
    return Trajectory(
        root=folder,
        base_model=str(data["base_model"]),
        base_hash=str(data["base_hash"]),
        config=data.get("config", {}),
        checkpoints=records,
        complete=bool(data.get("complete", False)),
        versions=data.get("versions", {}),
        log=tuple(data.get("log") or ()),
    )


def prepare_run_dir(out: Path, *, resume: bool, overwrite: bool) -> Trajectory | None:
    """Check a run folder before training into it.

    A folder holding a run (a manifest or a ``checkpoints/`` folder) is refused unless ``resume``
    (continue it) or ``overwrite`` (delete the files safegeom wrote there, nothing else:
    :func:`~safegeom.outputs.remove_written`). Resuming a folder without a manifest starts
    afresh; resuming a run checks that every checkpoint it lists is there whole.

    Returns:
        The run to resume, or ``None`` for a fresh start.

    Raises:
        OutputPathError: the folder holds a run and neither flag is set.
        ConfigError: both flags are set.
        ArtifactError: resuming, a listed checkpoint lacks its folder, weights or trainer state
            (the message names it).
    """
    if resume and overwrite:
        raise ConfigError("pass either --resume or --overwrite, not both")
    has_manifest = (out / MANIFEST).is_file()
    has_run = has_manifest or (out / "checkpoints").exists()
    if has_run and not (resume or overwrite):
        raise OutputPathError(
            f"{out} already holds a training run; pass --resume to continue it or --overwrite "
            "to replace it"
        )
    if has_run and (overwrite or not has_manifest):
        remove_written(out)  # the files safegeom wrote there; the user's own stay
        return None
    if not has_manifest:
        return None
    trajectory = load_trajectory(out)
    for record in trajectory.checkpoints:  # a run is continued only whole
        lacking = missing_piece(out / record.path)
        if lacking is not None:
            raise ArtifactError(
                f"cannot resume {out}: its checkpoint {record.path} {lacking}; pass --overwrite "
                "to train the run again"
            )
    return trajectory


def missing_piece(folder: Path) -> str | None:
    """What the checkpoint in ``folder`` lacks, in words, or ``None`` when its files are all
    there: the folder, weights (a ``.safetensors`` file) and the trainer state. Their contents
    are checked where a run resumes (:func:`~safegeom.training.checkpoints.resumable`)."""
    state = folder / TRAINER_STATE
    if not folder.is_dir():
        return "is missing"
    if not any(folder.glob("*.safetensors")):
        return "holds no weights (no .safetensors file)"
    if not (state / "state.json").is_file() or not (state / "state.safetensors").is_file():
        return "holds no trainer state"
    return None
