"""Saving and checking checkpoints: weights, trainer state (optimizer, scheduler, RNG), resumability.

A checkpoint is written into a temp folder beside its final place and renamed into place before the
manifest that lists it is replaced atomically, so a run stopped at any moment (Ctrl-C, a kill)
leaves a manifest whose checkpoints are all complete. A checkpoint cut short by other means (a full
disk, a truncated copy) is found by :func:`resumable`, and ``--resume`` restarts from the last good
one.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from safegeom.artifacts import follow_umask, save_safetensors, write_json
from safegeom.errors import ArtifactError
from safegeom.models.checkpoint import safetensors_problem
from safegeom.training.trainable import Trainable
from safegeom.training.trajectory import (
    TRAINER_STATE,
    CheckpointRecord,
    Trajectory,
    write_trajectory,
)

__all__ = [
    "checkpoint_problem",
    "load_trainer_state",
    "resumable",
    "save_trainer_state",
    "write_checkpoint",
]


def save_trainer_state(
    folder: str | Path,
    *,
    optimizer_state: Mapping[str, Any],
    scheduler_state: Mapping[str, Any],
    extra: Mapping[str, Any],
) -> Path:
    """Save optimizer, scheduler and RNG state plus ``extra`` (step, data position ...).

    Tensors go to ``state.safetensors`` (no pickles), the rest to ``state.json``. The RNG states
    saved are the current ones of ``random``, numpy, torch and, where present, CUDA.

    Returns:
        The folder written.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    plain_state: dict[str, dict[str, Any]] = {}
    for pid, values in optimizer_state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain_state.setdefault(str(pid), {})[key] = value
    np_state = np.random.get_state()
    meta = {
        "optimizer_param_groups": list(optimizer_state["param_groups"]),
        "optimizer_plain_state": plain_state,
        "scheduler": dict(scheduler_state),
        "rng_python": list(random.getstate()),
        "rng_numpy": [np_state[0], np_state[1].tolist(), *[x for x in np_state[2:]]],
        **extra,
    }
    save_safetensors(out / "state.safetensors", tensors, {})
    write_json(out / "state.json", meta)
    return out


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def load_trainer_state(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Read what :func:`save_trainer_state` wrote and restore the RNG states it saved.

    Returns:
        ``(optimizer_state, scheduler_state, meta)``: the first two ready for ``load_state_dict``;
        ``meta`` holds the ``extra`` entries.

    Raises:
        ArtifactError: the folder holds no trainer state.
    """
    src = Path(folder)
    if not (src / "state.json").is_file() or not (src / "state.safetensors").is_file():
        raise ArtifactError(f"{src} holds no trainer state; the checkpoint cannot be resumed")
    meta = json.loads((src / "state.json").read_text(encoding="utf-8"))
    tensors = load_file(str(src / "state.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        kind, _, rest = name.partition(".")
        if kind == "optimizer":
            pid, _, key = rest.partition(".")
            state.setdefault(int(pid), {})[key] = tensor
    for pid, values in meta.pop("optimizer_plain_state").items():
        state.setdefault(int(pid), {}).update(values)
    groups = []
    for group in meta.pop("optimizer_param_groups"):
        groups.append({k: v if k == "params" else _tuples(v) for k, v in group.items()})
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(_tuples(meta.pop("rng_python")))
    kind, keys, *rest_np = meta.pop("rng_numpy")
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest_np))
    scheduler = meta.pop("scheduler")
    return {"state": state, "param_groups": groups}, scheduler, meta


def checkpoint_problem(folder: Path) -> str | None:
    """Why the checkpoint in ``folder`` cannot be resumed from, or ``None`` when it can.

    Every ``.safetensors`` file (weights or adapter, and the trainer state) must be complete and
    ``trainer_state/state.json`` must be JSON.
    """
    state = folder / TRAINER_STATE
    if not folder.is_dir():
        return "its folder is missing"
    if not (state / "state.json").is_file() or not (state / "state.safetensors").is_file():
        return "it holds no trainer state"
    for path in [*sorted(folder.glob("*.safetensors")), state / "state.safetensors"]:
        problem = safetensors_problem(path)
        if problem:
            return f"{path.name}: {problem}"
    try:
        json.loads((state / "state.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "trainer_state/state.json is not JSON"
    return None


def resumable(trajectory: Trajectory) -> Trajectory:
    """Return ``trajectory`` without its trailing checkpoints that cannot be resumed from.

    A checkpoint cut short (a full disk, a killed copy) is skipped with a warning that names it,
    and the run resumes from the last good one; its later steps are trained again.

    Raises:
        ArtifactError: no checkpoint of the run can be resumed from.
    """
    kept = list(trajectory.checkpoints)
    while kept:
        problem = checkpoint_problem(trajectory.root / kept[-1].path)
        if problem is None:
            break
        bad = kept.pop()
        if kept:
            warnings.warn(
                f"{trajectory.root / bad.path} cannot be resumed from ({problem}); resuming from "
                f"step {kept[-1].step} instead",
                stacklevel=2,
            )
    if not kept:
        raise ArtifactError(
            f"no checkpoint in {trajectory.root} can be resumed from; rerun with --overwrite"
        )
    if len(kept) == len(trajectory.checkpoints):
        return trajectory
    return dataclasses.replace(trajectory, checkpoints=tuple(kept), complete=False)


def write_checkpoint(
    trainable: Trainable,
    module: torch.nn.Module,
    traj: Trajectory,
    record: CheckpointRecord,
    *,
    optimizer_state: Mapping[str, Any],
    scheduler_state: Mapping[str, Any],
    num_processes: int,
    weights: dict[str, torch.Tensor] | None = None,
    complete: bool = False,
) -> str:
    """Write the checkpoint ``record`` (temp folder + rename) and rewrite the manifest.

    ``module`` is the unwrapped trained module; ``weights`` (FSDP) the gathered weights to write
    instead of its own. The trainer state records the step, the data position (``step ×
    batch_size``, the global batch) and ``num_processes``. Single-process: under a launcher the
    training loop (:func:`safegeom.training.loop.save_checkpoint`) calls it on rank 0 alone.

    Returns:
        The weight hash of the written checkpoint.
    """
    final = traj.root / record.path
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if weights is not None:
        digest = trainable.save(tmp, module, weights)
    else:
        digest = trainable.save(tmp, module)
    if trainable.sidecar is not None:
        trainable.sidecar(tmp)
    save_trainer_state(
        tmp / TRAINER_STATE,
        optimizer_state=optimizer_state,
        scheduler_state=scheduler_state,
        extra={
            "step": record.step,
            "data_position": record.step * int(traj.config["batch_size"]),
            "num_processes": num_processes,
        },
    )
    follow_umask(tmp)  # save_pretrained leaves its weights 0o600
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    saved = traj.with_checkpoint(dataclasses.replace(record, weight_hash=digest), complete=complete)
    write_trajectory(saved)
    return digest
