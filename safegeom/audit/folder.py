"""The audit folder's bookkeeping: what must match to continue it, preparing it, the manifest,
and the final table (all written by rank 0 alone; see :mod:`~safegeom.audit.runner`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from safegeom.artifacts import git_sha, read_json, save_parquet, write_json
from safegeom.audit.config import AuditConfig
from safegeom.audit.inputs import AuditInputs
from safegeom.audit.result import FORMAT, AuditResult, load_audit
from safegeom.audit.schema import frame, with_anchor
from safegeom.config import config_dict
from safegeom.errors import ConfigError, OutputPathError
from safegeom.models.loading import LoadConfig
from safegeom.outputs import remove_written

__all__ = ["AuditRun", "finish", "identity", "manifest", "start", "thawed"]

_IDENTITY_LOAD = ("dtype", "merge_adapter", "revision", "layout", "chat_template")
"""LoadConfig fields that change the numbers (the device only changes where they are computed)."""
_NOT_IDENTITY = ("threads",)
"""AuditConfig fields that change how fast the numbers come, not which (to float rounding)."""


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "safegeom"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def identity(config: AuditConfig, load: LoadConfig, inputs: AuditInputs) -> dict[str, Any]:
    """What must be equal for a rerun to continue an audit folder."""
    loading = config_dict(load)
    settings = {k: v for k, v in config_dict(config).items() if k not in _NOT_IDENTITY}
    if not config.anchors:  # an audit without anchors continues one made before they existed
        settings.pop("anchors", None)
    out = {
        "config": settings,
        "load": {k: loading[k] for k in _IDENTITY_LOAD},
        "base": inputs.base.path,
    }
    if config.attacks:  # their contents: a set rewritten in the same folder is another set
        from safegeom.audit.transfer_rows import attack_hashes

        out["attacks"] = attack_hashes(config.attacks)
    return out


@dataclasses.dataclass(frozen=True)
class AuditRun:
    """What every write to one audit folder needs: where, what is audited, and how."""

    out: Path
    """The audit folder."""
    identity: dict[str, Any]
    """What must be equal for a rerun to continue the folder (:func:`identity`)."""
    inputs: AuditInputs
    """The base and the checkpoints."""
    task: Any
    """The behavioural task, or ``None``."""
    config: AuditConfig
    """The audit's settings."""
    threads: int | None = None
    """torch CPU threads this call measures with (:mod:`safegeom.threads`), when known."""


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    names = []
    for part in ("config", "load"):
        a, b = old.get(part, {}) or {}, new[part]
        names += [f"{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if old.get("base") != new["base"]:
        names.append("base")
    if old.get("attacks") != new.get("attacks") and "attacks" not in names:
        names.append("attack sets")
    return names


def _prepare(out: Path, identity: dict[str, Any], overwrite: bool) -> None:
    """Refuse a folder holding another audit; with ``overwrite`` delete the files safegeom wrote
    there (:func:`~safegeom.outputs.remove_written`), never the user's own.

    The folder is claimed (:func:`~safegeom.outputs.claim_folder`): without ``overwrite`` every
    file in it is safegeom's, so a piece of an audit found here is one safegeom wrote.
    """
    manifest = out / "manifest.json"
    pieces = ("manifest.json", "audit.parquet", "checkpoints", "reference")
    if (out / "trajectory.json").exists():
        raise OutputPathError(f"--out {out} holds a training run; give the audit its own folder")
    if overwrite:
        remove_written(out)
        return
    if not any((out / p).exists() for p in pieces):
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


def manifest(run: AuditRun, reference_s: float | None, complete: bool) -> dict[str, Any]:
    """The manifest of ``run.out`` as it stands: identity, inputs, versions, the finished
    checkpoints' records (read from their files), timings in seconds (``reference_s``, the
    Reference's build, added to those already recorded), the torch threads each phase used
    (``threads``: the Reference's build and each checkpoint, :mod:`safegeom.threads`), forward
    passes, ``complete``.

    Returns:
        The manifest, JSON-ready (rank 0 writes it).
    """
    out, identity, inputs, task = run.out, run.identity, run.inputs, run.task
    previous: dict[str, Any] = {}
    if (out / "manifest.json").is_file():
        previous = read_json(out / "manifest.json", what="audit manifest")
    timings = dict(previous.get("timings", {}) or {})
    threads = dict(previous.get("threads", {}) or {})
    if reference_s:
        timings["reference"] = reference_s
        threads["reference"] = run.threads
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
        "seeds": {"seed": run.config.seed},
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
        "threads": {**threads, **{f["label"]: f["threads"] for f in facts if "threads" in f}},
        "forward_passes": sum(int(f.get("forward_passes", 0)) for f in facts),
        "complete": complete,
    }


def start(run: AuditRun, overwrite: bool) -> list[str]:
    """Rank 0: check and prepare ``run.out``, write the first manifest.

    Returns:
        The labels of the checkpoints still to measure (no Parquet file yet, or one that cannot
        be read back), in step order.
    """
    out = run.out
    _prepare(out, run.identity, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "manifest.json", manifest(run, None, False))
    rows = out / "checkpoints"
    return [t.label for t in run.inputs.targets if not _finished(rows / f"{t.label}.parquet")]


def _finished(parquet: Path) -> bool:
    """Whether a checkpoint's rows were written whole; a file that cannot be read back (cut off
    by a crash or a full disk) is removed, with its record, so the checkpoint is measured again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not parquet.is_file():
        return False
    try:
        pq.ParquetFile(parquet).read()
    except (pa.ArrowInvalid, OSError):
        parquet.unlink(missing_ok=True)
        parquet.with_suffix(".json").unlink(missing_ok=True)
        return False
    return True


def finish(run: AuditRun, reference_s: float | None) -> AuditResult:
    """Rank 0: every checkpoint's rows as ``audit.parquet`` (step order), the complete manifest.

    Returns:
        The audit read back (:func:`load_audit`).
    """
    out = run.out
    tables = [
        with_anchor(pd.read_parquet(out / "checkpoints" / f"{t.label}.parquet"))
        for t in run.inputs.targets
    ]
    table = frame([]) if not tables else pd.concat(tables, ignore_index=True)
    save_parquet(out / "audit.parquet", table)
    write_json(out / "manifest.json", manifest(run, reference_s, True))
    return load_audit(out)


def thawed(result: AuditResult) -> dict[str, Any]:
    """The result's read-only manifest as plain dicts and lists (to send it to the other ranks)."""

    def thaw(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: thaw(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [thaw(v) for v in value]
        return value

    return thaw(result.manifest)
