"""Run an audit: the base once, its Reference once, then every checkpoint, resumably.

An audit folder holds::

    DIR/manifest.json                 config, seeds, versions, git SHA, weight hashes, timings
    DIR/reference/                    the base's carriers (engineer B's Reference.save)
    DIR/checkpoints/<label>.json      one checkpoint's facts (step, weight hash, timings)
    DIR/checkpoints/<label>.parquet   its rows; written last, atomically: its presence means done
    DIR/audit.parquet                 all rows, in step order (written when every checkpoint is done)

Rerunning the same call skips every checkpoint whose Parquet file exists and loads the Reference
back, so an audit killed at any point and rerun gives the table an uninterrupted one would (the
measurements depend on ``config.seed`` only). A changed config (or dtype, or base) is refused
unless ``overwrite``; new checkpoints (a trajectory trained further) are simply added. A rerun
trusts the files of finished checkpoints: after retraining into the same run folder, pass
``overwrite``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from safegeom.artifacts import (
    check_output_dir,
    git_sha,
    read_json,
    save_parquet,
    write_json,
)
from safegeom.audit.config import AuditConfig
from safegeom.audit.inputs import AuditInputs, AuditTarget, check_prompt_sets, resolve_inputs
from safegeom.audit.result import FORMAT, AuditResult, load_audit
from safegeom.audit.schema import frame
from safegeom.config import config_dict
from safegeom.errors import ConfigError, OutputPathError, SafegeomError
from safegeom.models.loading import LoadConfig, LoadedModel, load_model

__all__ = ["audit"]

_IDENTITY_LOAD = ("dtype", "merge_adapter", "revision", "layout", "chat_template")
"""LoadConfig fields that change the numbers (the device only changes where they are computed)."""


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "safegeom"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def _identity(config: AuditConfig, load: LoadConfig, inputs: AuditInputs) -> dict[str, Any]:
    """What must be equal for a rerun to continue an audit folder."""
    loading = config_dict(load)
    return {
        "config": config_dict(config),
        "load": {k: loading[k] for k in _IDENTITY_LOAD},
        "base": inputs.base.path,
    }


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    names = []
    for part in ("config", "load"):
        a, b = old.get(part, {}) or {}, new[part]
        names += [f"{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if old.get("base") != new["base"]:
        names.append("base")
    return names


def _prepare(out: Path, identity: dict[str, Any], overwrite: bool) -> None:
    """Refuse a folder holding another audit (or another thing); clear it with ``overwrite``."""
    manifest = out / "manifest.json"
    pieces = ("manifest.json", "audit.parquet", "checkpoints", "reference")
    if (out / "trajectory.json").exists():
        raise OutputPathError(f"--out {out} holds a training run; give the audit its own folder")
    if not any((out / p).exists() for p in pieces):
        return
    if overwrite:
        for piece in pieces:
            target = out / piece
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        return
    if not manifest.is_file():
        raise OutputPathError(
            f"--out {out} holds part of an audit but no manifest.json; pass --overwrite to "
            "replace it"
        )
    old = read_json(manifest, what="audit manifest")
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        raise OutputPathError(f"--out {out} holds something else; pass --overwrite to replace it")
    changed = _differences(old.get("identity", {}), identity)
    if changed:
        raise ConfigError(
            f"--out {out} holds an audit made with other settings ({', '.join(changed)} "
            "differ); pass --overwrite to replace it, or choose another --out"
        )


def _task(config: AuditConfig, inputs: AuditInputs) -> Any:
    """The task of task_accuracy: the config's (an error if bad), else the run's (a warning)."""
    from safegeom.train.tasks import get_task

    if "behaviour" not in config.families:
        return None
    if config.task is not None:
        try:
            return get_task(config.task)
        except SafegeomError as err:
            raise type(err)(f"--task: {err}") from None
    if inputs.task is None:
        return None
    try:
        return get_task(inputs.task)
    except SafegeomError as err:
        warnings.warn(f"no task_accuracy: the run's task cannot be rebuilt ({err})", stacklevel=3)
        return None


class _Base:
    """The base model, loaded on first use (a finished audit rerun loads nothing)."""

    def __init__(self, target: AuditTarget, load: LoadConfig) -> None:
        self.target, self.load, self._lm = target, load, None
        self.seconds = 0.0

    def get(self) -> LoadedModel:
        if self._lm is None:
            start = time.perf_counter()
            self._lm = load_model(self.target.path, self.load)
            self.seconds = time.perf_counter() - start
        return self._lm


def _reference(out: Path, base: _Base, config: AuditConfig, progress: bool) -> tuple[Any, float]:
    """Load the saved Reference back, or build it from the base and save it atomically."""
    import safegeom.audit.reference as reference_mod

    folder = out / "reference"
    if folder.is_dir():
        return reference_mod.load_reference(folder), 0.0
    start = time.perf_counter()
    ref = reference_mod.build_reference(base.get(), config, progress=progress)
    tmp = out / ".reference.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ref.save(tmp)
    os.replace(tmp, folder)
    return ref, time.perf_counter() - start


def _measure(
    target: AuditTarget,
    base: _Base,
    reference: Any,
    config: AuditConfig,
    load: LoadConfig,
    task: Any,
    out: Path,
    progress: bool,
) -> None:
    """Measure one model and write its facts, then its rows (atomically, rows last)."""
    import safegeom.audit.measure as measure_mod

    is_base = target is base.target
    start = time.perf_counter()
    lm = base.get() if is_base else load_model(target.path, load)
    load_s = base.seconds if is_base else time.perf_counter() - start
    measured = measure_mod.measure_checkpoint(
        lm, reference, config, base=base.get(), task=task, progress=progress
    )
    rows = [{**row, "checkpoint": target.label, "step": target.step} for row in measured.rows]
    facts = {
        "label": target.label,
        "step": target.step,
        "path": target.path,
        "kind": target.kind,
        "weight_hash": lm.weight_hash,
        "seconds": {"load": load_s, **{k: float(v) for k, v in measured.seconds.items()}},
        "forward_passes": int(measured.forward_passes),
    }
    write_json(out / "checkpoints" / f"{target.label}.json", facts)
    save_parquet(out / "checkpoints" / f"{target.label}.parquet", frame(rows))


def _manifest(
    out: Path,
    identity: dict[str, Any],
    inputs: AuditInputs,
    task: Any,
    config: AuditConfig,
    reference_s: float | None,
    complete: bool,
) -> dict[str, Any]:
    previous: dict[str, Any] = {}
    if (out / "manifest.json").is_file():
        previous = read_json(out / "manifest.json", what="audit manifest")
    timings = dict(previous.get("timings", {}) or {})
    if reference_s:
        timings["reference"] = reference_s
    facts = []
    for t in inputs.targets:
        file = out / "checkpoints" / f"{t.label}.json"
        if file.is_file() and (out / "checkpoints" / f"{t.label}.parquet").is_file():
            facts.append(read_json(file, what="checkpoint record"))
    return {
        "format": FORMAT,
        "identity": identity,
        "config": identity["config"],
        "load": identity["load"],
        "seeds": {"seed": config.seed},
        "inputs": {
            "source": inputs.source,
            "base": dataclasses.asdict(inputs.base),
            "checkpoints": [dataclasses.asdict(t) for t in inputs.checkpoints],
            "task": None if task is None else getattr(task, "name", str(task)),
        },
        "versions": _versions(),
        "git_sha": git_sha(),
        "base_hash": next((f["weight_hash"] for f in facts if f["step"] == 0), None),
        "checkpoints": facts,
        "timings": timings,
        "forward_passes": sum(int(f.get("forward_passes", 0)) for f in facts),
        "complete": complete,
    }


def audit(
    targets_or_spec: AuditInputs | str | Path | Sequence[str | Path],
    out: str | Path,
    config: AuditConfig | None = None,
    *,
    load: LoadConfig | None = None,
    base: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **fields: Any,
) -> AuditResult:
    """Audit a checkpoint trajectory against its base; resumable in ``out``.

    Args:
        targets_or_spec: a run folder, a Trainer output folder, ``[BASE, CKPT, ...]``, or
            :class:`~safegeom.audit.inputs.AuditInputs` (see :func:`resolve_inputs`).
        out: the audit folder, checked before any work.
        config: what to measure (default :class:`AuditConfig`); ``fields`` replace its fields.
        load: how to load every model.
        base: the base model, overriding the one the inputs name.
        overwrite: replace an audit in ``out`` made with other settings.
        progress: show a progress bar over the checkpoints.

    Returns:
        The :class:`AuditResult` (also saved in ``out``; :func:`load_audit` reads it back).

    Raises:
        SafegeomError: bad inputs (see :func:`resolve_inputs`), an empty prompt set, an unusable
            ``out``, or ``out`` holding an audit with other settings (ConfigError, names
            ``--overwrite``).
    """
    try:
        config = dataclasses.replace(config or AuditConfig(), **fields)
    except TypeError as err:
        raise TypeError(f"audit(): {err}; the settings are the fields of AuditConfig") from None
    load = load or LoadConfig()
    folder = check_output_dir(out)
    if isinstance(targets_or_spec, AuditInputs):
        inputs = targets_or_spec
    else:
        paths = [targets_or_spec] if isinstance(targets_or_spec, (str, Path)) else targets_or_spec
        inputs = resolve_inputs(list(paths), base=base, load=load)
    check_prompt_sets(config)
    task = _task(config, inputs)
    identity = _identity(config, load, inputs)
    _prepare(folder, identity, overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(
        folder / "manifest.json", _manifest(folder, identity, inputs, task, config, None, False)
    )

    def done(t: AuditTarget) -> bool:
        return (folder / "checkpoints" / f"{t.label}.parquet").is_file()

    todo = [t for t in inputs.targets if not done(t)]
    reference_s = None
    if todo:
        from tqdm.auto import tqdm

        base_model = _Base(inputs.base, load)
        reference, reference_s = _reference(folder, base_model, config, progress)
        bar = tqdm(total=len(inputs.targets), initial=len(inputs.targets) - len(todo),
                   desc="audit", unit="ckpt", disable=not progress)  # fmt: skip
        for target in todo:
            bar.set_postfix_str(target.label)
            _measure(target, base_model, reference, config, load, task, folder, progress)
            write_json(
                folder / "manifest.json",
                _manifest(folder, identity, inputs, task, config, reference_s, False),
            )
            reference_s = None
            bar.update(1)
        bar.close()
    tables = [
        pd.read_parquet(folder / "checkpoints" / f"{t.label}.parquet") for t in inputs.targets
    ]
    save_parquet(
        folder / "audit.parquet", frame([]) if not tables else pd.concat(tables, ignore_index=True)
    )
    write_json(
        folder / "manifest.json",
        _manifest(folder, identity, inputs, task, config, reference_s, True),
    )
    return load_audit(folder)
