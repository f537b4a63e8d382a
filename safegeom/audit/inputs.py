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

``--base`` wins over the base a PEFT adapter names: every adapter is then loaded onto it (an
adapter trained on another machine names a path that may not exist here). Without it, an error
about that base says it came from ``adapter_config.json`` and names ``--base``.

Every checkpoint is checked cheaply (its ``config.json`` and tokenizer files, never its weights):
that it exists, can be read, and has the base's architecture, hidden size, vocabulary size and
tokenizer (:mod:`safegeom.models.vocab`).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safegeom.audit.input_forms import (
    BASE_LABEL,
    from_list,
    from_trajectory,
    step_of,
    unique_labels,
)
from safegeom.errors import (
    ArtifactError,
    ConfigError,
    ModelLoadError,
    NotFoundError,
    SafegeomError,
)
from safegeom.models.checkpoint import (
    SourceForm,
    adapter_base_spec,
    check_weight_files,
    resolve_source,
    safetensors_problem,
)
from safegeom.models.loading import TINY_CHAT, LoadConfig, tiny_chat_path
from safegeom.models.vocab import Vocabulary, check_same_vocabulary, read_vocabulary

__all__ = ["AuditInputs", "AuditTarget", "check_prompt_sets", "resolve_inputs", "step_of"]

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
    form: SourceForm = "full"
    """How it is stored: ``full`` checkpoint, PEFT ``adapter`` folder, ``refusalguard`` edit, or
    ``hub`` id (:data:`~safegeom.models.checkpoint.SourceForm`)."""
    base: str | None = None
    """The model a PEFT adapter is loaded onto (``--base``), in place of the base its
    ``adapter_config.json`` names; ``None``: that base."""


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


def _locate(spec: str, load: LoadConfig, what: str) -> tuple[SourceForm, str]:
    """``(form, location)`` of a model spec, with its weights checked when local."""
    if spec == TINY_CHAT:
        return "full", str(tiny_chat_path())
    path = Path(spec).expanduser()
    if not path.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise NotFoundError(f"{what} {spec}: no such folder")
    try:
        form, location = resolve_source(spec, TINY_CHAT, tiny_chat_path(), load.revision)
    except ModelLoadError as err:
        raise ModelLoadError(f"{what}: {err}") from None
    if form == "full":
        try:
            check_weight_files(location, load.allow_pickle)
        except ModelLoadError as err:
            raise ModelLoadError(f"{what} {spec} cannot be loaded: {err}") from None
    elif form == "adapter":
        weights = Path(location) / "adapter_model.safetensors"
        problem = safetensors_problem(weights) if weights.is_file() else "it is missing"
        if problem and not (Path(location) / "adapter_model.bin").is_file():
            raise ModelLoadError(
                f"{what} {spec} cannot be loaded: adapter_model.safetensors: {problem}"
            )
    return form, location  # type: ignore[return-value]


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


def _named_by(err: SafegeomError, adapter: str) -> SafegeomError:
    """``err`` about the base an adapter names, saying where the name came from and the fix."""
    return type(err)(
        f"{err} (the path is base_model_name_or_path in {Path(adapter) / 'adapter_config.json'}); "
        "pass --base MODEL to audit the adapter on a base on this machine"
    )


def _base_of(
    spec: str, form: SourceForm, location: str, load: LoadConfig, what: str, base: str | None
) -> tuple[str, SourceForm, str]:
    """``(spec, form, location)`` of the model an adapter or edit is loaded onto: ``base``
    (``--base``) for an adapter when given, else the base its own files name."""
    named = base if form == "adapter" and base else None
    named = named or (adapter_base_spec(location) if form == "adapter" else _edit_base(location))
    try:
        return (named, *_locate(named, load, f"{what} {spec}: its base"))
    except (NotFoundError, ModelLoadError) as err:
        if form != "adapter" or base:
            raise
        raise _named_by(err, location) from None


def _arch(
    spec: str, form: SourceForm, location: str, load: LoadConfig, what: str, base: str | None = None
) -> dict[str, Any]:
    """Architecture facts from config.json (an adapter's: its base's, ``base`` when given),
    without the weights."""
    from transformers import AutoConfig

    if form in ("adapter", "refusalguard"):
        return _arch(*_base_of(spec, form, location, load, what, base), load, what)
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


def _vocabulary(
    spec: str, form: SourceForm, location: str, load: LoadConfig, what: str, base: str | None = None
) -> Vocabulary:
    """The vocabulary facts of a target from its files (an adapter's or edit's: its base's
    embedding, ``base``'s when given, and its own tokenizer where it saved one); nothing for a
    hub id."""
    if form in ("adapter", "refusalguard"):
        inherited = _vocabulary(*_base_of(spec, form, location, load, what, base), load, what)
        own = read_vocabulary(location)
        if own.fingerprint is None:
            return inherited
        return Vocabulary(inherited.embedding_rows, own.tokenizer_size, own.fingerprint)
    if not Path(location).is_dir():
        return Vocabulary(None, None, None)
    return read_vocabulary(location)


def _check_exists(given: Sequence[str], base: str | None) -> None:
    """Refuse a single local path that does not exist before guessing what it is."""
    first = given[0]
    path = Path(first).expanduser()
    hub_like = first.count("/") == 1 and not first.startswith((".", "/", "~"))
    if len(given) == 1 and first != TINY_CHAT and not hub_like and not path.exists():
        raise NotFoundError(
            f"{first}: no such path; give a run folder, a Trainer output folder, or "
            + ("CKPT [CKPT ...] with --base" if base else "BASE CKPT [CKPT ...]")
        )


def _check_same(base: dict[str, Any], other: dict[str, Any], spec: str, base_spec: str) -> None:
    if other["model_type"] != base["model_type"] or (
        base["architectures"]
        and other["architectures"]
        and base["architectures"] != other["architectures"]
    ):
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


def _trainer_dirs(root: Path) -> list[tuple[str, int, str]]:
    found = []
    for p in root.iterdir():
        if not (m := _TRAINER_DIR.match(p.name)):
            continue
        _check_link(p)
        if p.is_dir():
            found.append((p.name, int(m.group(1)), str(p)))
    return sorted(found, key=lambda item: item[1])


def _check_link(entry: Path) -> None:
    """Refuse a ``checkpoint-N`` symlink that leads nowhere (dangling, or a loop)."""
    if not entry.is_symlink():
        return
    try:
        entry.resolve(strict=True)
    except RuntimeError:  # a symlink loop on Python < 3.13
        problem = "is a symlink loop"
    except OSError as err:
        problem = "is a symlink loop" if err.errno == errno.ELOOP else "is a dangling symlink"
    else:
        return
    raise NotFoundError(
        f"{entry} {problem} (to {os.readlink(entry)}); point it at a checkpoint folder or remove it"
    )


def _is_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()


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
    _check_exists(given, base)
    override, named_by = base, None  # --base; the adapter whose adapter_config.json names it
    if len(given) == 1 and (first / "trajectory.json").is_file():
        run_base, items, task = from_trajectory(first)
        base, source = base or run_base, "trajectory"
    elif len(given) == 1 and base is None and (first / "adapter_config.json").is_file():
        base, items = adapter_base_spec(str(first)), from_list(given)  # an adapter names its base
        named_by = str(first)
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
            base, named_by = adapter_base_spec(adapters[0]), adapters[0]
    elif base is None:
        if len(given) < 2:
            raise ConfigError(
                f"{given[0]} is a single model; give BASE CKPT [CKPT ...], a run folder, or "
                "a Trainer output folder"
            )
        base, items = given[0], from_list(given[1:])
    else:
        items = from_list(given)
    try:
        base_form, base_location = _locate(base, load, "base model")
    except (NotFoundError, ModelLoadError) as err:
        raise (_named_by(err, named_by) if named_by else err) from None
    base_arch = _arch(base, base_form, base_location, load, "base model")
    base_vocab = _vocabulary(base, base_form, base_location, load, "base model")
    targets = []
    for label, step, path in unique_labels(items):
        form, location = _locate(path, load, "checkpoint")
        facts = _arch(path, form, location, load, "checkpoint", override)
        _check_same(base_arch, facts, path, base)
        check_same_vocabulary(
            base_vocab, _vocabulary(path, form, location, load, "checkpoint", override), path, base
        )
        moved = form == "adapter" and override and override != adapter_base_spec(location)
        onto = override if moved else None  # recorded where --base differs from its own
        targets.append(AuditTarget(label=label, step=step, path=path, form=form, base=onto))
    steps = [t.step for t in targets]
    if len(set(steps)) != len(steps) or 0 in steps:
        raise ConfigError(
            f"checkpoint steps {steps} repeat or include 0 (the base); give distinct folders"
        )
    base_target = AuditTarget(label=BASE_LABEL, step=0, path=base, form=base_form)
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
