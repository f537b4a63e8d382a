"""What an audit runs on: the base model and its checkpoints, found and checked before any work.

Three forms of input (:func:`resolve_inputs`):

- a safegeom run folder (``trajectory.json``): the base is the run's base model, the checkpoints
  its saved steps after step 0 (the step-0 checkpoint is the base itself), the default task the
  run's task;
- ``BASE CKPT [CKPT ...]``: full or PEFT adapter folders (or hub ids); steps come from the folder
  names when every name carries one (``step-000040``, ``checkpoint-40``), else from the order
  1, 2, ...;
- a folder of HF Trainer checkpoints (``checkpoint-N/`` subfolders): ordered by N; the base comes
  from ``--base`` or from a PEFT adapter's ``base_model_name_or_path``.

Every checkpoint is checked cheaply (its ``config.json``, never its weights): that it exists, can
be read, and has the base's architecture and hidden size.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from safegeom.errors import ArtifactError, ConfigError, ModelLoadError, NotFoundError
from safegeom.models.checkpoint import check_weight_files, resolve_source, safetensors_problem
from safegeom.models.loading import TINY_CHAT, LoadConfig, tiny_chat_path

__all__ = ["AuditInputs", "AuditTarget", "check_prompt_sets", "resolve_inputs", "step_of"]

Kind = Literal["full", "adapter", "refusalguard", "hub"]
BASE_LABEL = "base"
"""Label of the base model (step 0) in the table."""
_STEP_NAME = re.compile(r"^(?:step|checkpoint|ckpt)[-_]?0*(\d+)$", re.IGNORECASE)
_TRAINER_DIR = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class AuditTarget:
    """One model of the audit: its label in the table, its step, and where it is."""

    label: str
    """Name in the table's ``checkpoint`` column (``base``, ``step-000040``, a folder name)."""
    step: int
    """Training step (the base is 0)."""
    path: str
    """A checkpoint or PEFT adapter folder, ``tiny-chat``, or a hub id."""
    kind: Kind = "full"
    """``full`` checkpoint, PEFT ``adapter`` folder, or ``hub`` id."""


@dataclass(frozen=True)
class AuditInputs:
    """The base and the checkpoints of an audit, in step order, and where they came from."""

    base: AuditTarget
    """The aligned model (step 0): the reference of every drift and fixed-source number."""
    checkpoints: tuple[AuditTarget, ...]
    """The checkpoints after the base, by increasing step."""
    task: str | None = None
    """Default task for task_accuracy (a run folder's task), when known."""
    source: str = "list"
    """``trajectory``, ``trainer`` or ``list``."""

    @property
    def targets(self) -> tuple[AuditTarget, ...]:
        """The base, then the checkpoints, in step order."""
        return (self.base, *self.checkpoints)


def step_of(name: str) -> int | None:
    """The step a folder name carries (``step-000040``, ``checkpoint-40`` → 40), else ``None``."""
    match = _STEP_NAME.match(name)
    return int(match.group(1)) if match else None


def _safe_label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._") or "checkpoint"


def _locate(spec: str, load: LoadConfig, what: str) -> tuple[Kind, str]:
    """``(kind, location)`` of a model spec, with its weights checked when local."""
    if spec == TINY_CHAT:
        return "full", str(tiny_chat_path())
    path = Path(spec).expanduser()
    if not path.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise NotFoundError(f"{what} {spec}: no such folder")
    try:
        kind, location = resolve_source(spec, TINY_CHAT, tiny_chat_path(), load.revision)
    except ModelLoadError as err:
        raise ModelLoadError(f"{what}: {err}") from None
    if kind == "full":
        try:
            check_weight_files(location, load.allow_pickle)
        except ModelLoadError as err:
            raise ModelLoadError(f"{what} {spec} cannot be loaded: {err}") from None
    elif kind == "adapter":
        weights = Path(location) / "adapter_model.safetensors"
        problem = safetensors_problem(weights) if weights.is_file() else "it is missing"
        if problem and not (Path(location) / "adapter_model.bin").is_file():
            raise ModelLoadError(
                f"{what} {spec} cannot be loaded: adapter_model.safetensors: {problem}"
            )
    return kind, location  # type: ignore[return-value]


def _adapter_base(location: str) -> str:
    file = Path(location) / "adapter_config.json"
    try:
        base = json.loads(file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise ModelLoadError(f"{file} is not a readable JSON object") from None
    if not base:
        raise ModelLoadError(f"{file} names no base_model_name_or_path; pass --base")
    return str(base)


def _edit_base(location: str) -> str:
    """The base a RefusalGuard checkpoint names (a relative path is tried against its folder)."""
    from safegeom.artifacts import read_json
    from safegeom.models.reft import CONFIG_FILE, FORMAT

    folder = Path(location)
    base = read_json(folder / CONFIG_FILE, what="RefusalGuard checkpoint", format=FORMAT).get(
        "base"
    )
    if not base:
        raise ModelLoadError(f"{folder / CONFIG_FILE} names no base model (field 'base')")
    relative = folder / str(base)
    return (
        str(relative) if not Path(base).expanduser().is_absolute() and relative.is_dir() else base
    )


def _arch(spec: str, kind: Kind, location: str, load: LoadConfig, what: str) -> dict[str, Any]:
    """Architecture facts from config.json (an adapter's: its base's), without the weights."""
    from transformers import AutoConfig

    if kind in ("adapter", "refusalguard"):
        base = _adapter_base(location) if kind == "adapter" else _edit_base(location)
        base_kind, base_location = _locate(base, load, f"{what} {spec}: its base")
        return _arch(base, base_kind, base_location, load, what)
    try:
        config = AutoConfig.from_pretrained(
            location, revision=load.revision, trust_remote_code=load.trust_remote_code
        )
    except Exception as err:  # a bad config.json, an unknown model type, an unreachable id
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelLoadError(f"{what} {spec}: cannot read its config.json: {first}") from None
    hidden = getattr(config, "hidden_size", None)
    archs = tuple(getattr(config, "architectures", None) or ())
    return {"model_type": str(config.model_type), "architectures": archs, "hidden_size": hidden}


def _check_same(base: dict[str, Any], other: dict[str, Any], spec: str, base_spec: str) -> None:
    if other["model_type"] != base["model_type"] or (
        base["architectures"] and other["architectures"]
        and base["architectures"] != other["architectures"]
    ):  # fmt: skip
        raise ConfigError(
            f"checkpoint {spec} is a {other['model_type']} model "
            f"({', '.join(other['architectures']) or 'no architectures'}), but the base "
            f"{base_spec} is a {base['model_type']} model "
            f"({', '.join(base['architectures']) or 'no architectures'}); audit checkpoints "
            "of the base's own architecture"
        )
    if other["hidden_size"] != base["hidden_size"]:
        raise ConfigError(
            f"checkpoint {spec} has hidden size {other['hidden_size']}, but the base {base_spec} "
            f"has {base['hidden_size']}; audit checkpoints fine-tuned from this base"
        )


def _from_trajectory(root: Path) -> tuple[str, list[tuple[str, int, str]], str | None]:
    from safegeom.train.trajectory import load_trajectory

    trajectory = load_trajectory(root)
    records = [c for c in trajectory.checkpoints if c.step > 0]
    if not records:
        raise ArtifactError(
            f"the trajectory in {root} is empty: it holds no checkpoint after step 0; train it "
            "(or resume it) first"
        )
    items = [(Path(c.path).name, c.step, str(root / c.path)) for c in records]
    for _, _, path in items:
        if not Path(path).is_dir():
            raise NotFoundError(
                f"checkpoint folder {path} (listed in {root}/trajectory.json) is missing"
            )
    task = trajectory.config.get("task")
    return trajectory.base_model, items, None if task is None else str(task)


def _trainer_dirs(root: Path) -> list[tuple[str, int, str]]:
    found = [
        (p.name, int(m.group(1)), str(p))
        for p in root.iterdir()
        if p.is_dir() and (m := _TRAINER_DIR.match(p.name))
    ]
    return sorted(found, key=lambda item: item[1])


def _from_list(paths: Sequence[str]) -> list[tuple[str, int, str]]:
    names = [Path(p).name or p for p in paths]
    steps = [step_of(n) for n in names]
    if all(s is not None for s in steps) and len(set(steps)) == len(steps):
        numbered = list(zip(names, steps, paths, strict=True))
    else:
        numbered = [(n, i + 1, p) for i, (n, p) in enumerate(zip(names, paths, strict=True))]
    return sorted(numbered, key=lambda item: item[1])  # type: ignore[arg-type,return-value]


def _is_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()


def _unique_labels(items: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    seen: set[str] = {BASE_LABEL}
    out = []
    for name, step, path in items:
        label = _safe_label(name)
        if label in seen:
            label = _safe_label(f"{Path(path).parent.name}_{name}")
        while label in seen:
            label = f"{label}_{step}"
        seen.add(label)
        out.append((label, step, path))
    return out


def resolve_inputs(
    paths: Sequence[str | Path], *, base: str | None = None, load: LoadConfig | None = None
) -> AuditInputs:
    """Find and check the base and checkpoints an audit runs on (cheap: no weights are read).

    Args:
        paths: one run folder, one HF Trainer output folder, or ``BASE CKPT [CKPT ...]`` (with
            ``base`` given: ``CKPT [CKPT ...]``).
        base: the base model, overriding a run folder's or an adapter's own.
        load: how models will be loaded (revision, allow_pickle, trust_remote_code).

    Returns:
        The :class:`AuditInputs`, checkpoints in step order.

    Raises:
        NotFoundError: a checkpoint folder is missing.
        ModelLoadError: a checkpoint cannot be loaded (no config, truncated weights).
        ArtifactError: an empty trajectory or Trainer folder.
        ConfigError: a checkpoint of another architecture or hidden size than the base; no base.
    """
    load = load or LoadConfig()
    given = [str(p) for p in paths]
    if not given:
        raise ConfigError("give a run folder, a Trainer output folder, or BASE CKPT [CKPT ...]")
    task: str | None = None
    source = "list"
    first = Path(given[0]).expanduser()
    if len(given) == 1 and (first / "trajectory.json").is_file():
        run_base, items, task = _from_trajectory(first)
        base, source = base or run_base, "trajectory"
    elif len(given) == 1 and base is None and (first / "adapter_config.json").is_file():
        base, items = _adapter_base(str(first)), _from_list(given)  # an adapter names its base
    elif len(given) == 1 and first.is_dir() and not _is_model(first):
        items = _trainer_dirs(first)
        if not items:
            raise ArtifactError(
                f"{first} holds no checkpoints: no trajectory.json and no checkpoint-N/ "
                "folders; give a run folder, a Trainer output folder, or BASE CKPT [CKPT ...]"
            )
        source = "trainer"
        if base is None:
            adapters = [p for _, _, p in items if (Path(p) / "adapter_config.json").is_file()]
            if not adapters:
                raise ConfigError(
                    f"the checkpoints in {first} are full models, so the base is not known; "
                    "name the aligned model with --base"
                )
            base = _adapter_base(adapters[0])
    elif base is None:
        if len(given) < 2:
            raise ConfigError(
                f"{given[0]} is a single model; give BASE CKPT [CKPT ...], a run folder, or "
                "a Trainer output folder"
            )
        base, items = given[0], _from_list(given[1:])
    else:
        items = _from_list(given)
    base_kind, base_location = _locate(base, load, "base model")
    base_arch = _arch(base, base_kind, base_location, load, "base model")
    targets = []
    for label, step, path in _unique_labels(items):
        kind, location = _locate(path, load, "checkpoint")
        _check_same(base_arch, _arch(path, kind, location, load, "checkpoint"), path, base)
        targets.append(AuditTarget(label=label, step=step, path=path, kind=kind))
    steps = [t.step for t in targets]
    if len(set(steps)) != len(steps) or 0 in steps:
        raise ConfigError(
            f"checkpoint steps {steps} repeat or include 0 (the base); give distinct folders"
        )
    base_target = AuditTarget(label=BASE_LABEL, step=0, path=base, kind=base_kind)
    return AuditInputs(base=base_target, checkpoints=tuple(targets), task=task, source=source)


def check_prompt_sets(config: Any) -> None:
    """Load every prompt set an :class:`~safegeom.audit.config.AuditConfig` names (cheap).

    Raises:
        SafegeomError: a set is unknown, missing or has no prompts; the message names the option.
    """
    from safegeom.config import flag
    from safegeom.errors import SafegeomError
    from safegeom.prompts import load_prompts

    fields = ("harmful", "harmless", "harmful_val", "harmless_val")
    named = [(f, s) for f in fields for s in getattr(config, f)]
    if "behaviour" in config.families:
        named += [("behaviour_harmful", s) for s in config.behaviour_harmful]
        named += [("behaviour_harmless", s) for s in config.behaviour_harmless]
    for field_name, spec in named:
        try:
            load_prompts(spec)
        except SafegeomError as err:
            raise type(err)(f"{flag(field_name)}: {err}") from None
