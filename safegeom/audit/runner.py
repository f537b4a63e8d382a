"""Run an audit: the base once, its Reference once, then every checkpoint, resumably.

An audit folder holds::

    DIR/manifest.json                 config, seeds, versions, git SHA, weight hashes, timings,
                                      torch threads per phase
    DIR/reference/                    the base's carriers (engineer B's Reference.save)
    DIR/anchors/<name>/               each anchor's carriers, saved the same way (--anchor)
    DIR/checkpoints/<label>.json      one checkpoint's facts (step, weight hash, timings)
    DIR/checkpoints/<label>.parquet   its rows; written last, atomically: its presence means done
    DIR/audit.parquet                 all rows, in step order (written when every checkpoint is done)

Rerunning the same call skips every checkpoint whose Parquet file exists and loads the Reference
back, so an audit killed at any point and rerun gives the table an uninterrupted one would (the
measurements depend on ``config.seed`` only). A changed config (or dtype, or base) is refused
unless ``overwrite``; new checkpoints (a trajectory trained further) are simply added. A rerun
trusts the files of finished checkpoints: after retraining into the same run folder, pass
``overwrite``. A resumed audit names the checkpoints it skips in one line on stderr.

Threads: the audit runs with ``config.threads`` torch CPU threads, else the count the user set
(``OMP_NUM_THREADS``, ``torch.set_num_threads``), else one per free core
(:func:`~safegeom.threads.choose_threads`), and restores the previous count when it returns. Thread counts change the numbers only to float
rounding; set ``threads`` (and ``batch_size``) for bit-identical reruns.

The folder's bookkeeping is :mod:`~safegeom.audit.folder`.

This runner is one of the entry points that call the rank primitives (:mod:`safegeom.parallel`);
each call runs inside :func:`~safegeom.parallel.dispatch.sharding`. Under a launcher
(:mod:`safegeom.parallel.ranks`, ``world_size() > 1``) the unit of work is a checkpoint, and the table is the one one process writes, whatever the number of processes:

- Every rank resolves the inputs and checks the prompt sets (read only); rank 0 alone checks and
  prepares ``out`` and decides which checkpoints are still to do (resume), and tells the others.
- Rank 0 builds the Reference (or loads it back) and saves it; every rank receives that very
  object (:func:`~safegeom.parallel.ranks.broadcast`), so all measure against the same carriers.
- The checkpoints still to do are dealt round robin (:func:`~safegeom.parallel.ranks.shard`); in
  rounds of one checkpoint per rank, each rank measures its own, the rows go to rank 0, and rank
  0 writes each checkpoint's files and the manifest, in step order, then ``audit.parquet``. The
  other ranks write nothing (not even the folder), and every rank returns the same result.
- A failure on one rank (a checkpoint that fails to load, NaN activations) stops every rank once
  the round's other checkpoints are written: the failing rank raises its own error, the others
  ``rank R of N failed: <message>``; a rerun continues from there.

One level of sharding only: a checkpoint is measured by one rank inside
:func:`~safegeom.parallel.ranks.alone`, so its captures, evaluations and causal sweeps run every
batch themselves (as in one process) instead of sharding prompts across ranks that are busy with
other checkpoints (which would deadlock). The Reference is built that way too, by rank 0: the
selection's float64 statistics are then one process's exactly (merged over ranks they would
agree only to rounding). Every random number derives from ``config.seed`` (local generators), so
a checkpoint's rows do not depend on which rank measured it, nor on what it measured before.
Batch sizes left to memory (``batch_size=None``) are chosen per rank as one process would; set
``batch_size`` for bit-identical numbers across machines with different free memory. Ranks wait
for each other once per round (and while rank 0 builds the Reference): one checkpoint's
measurement must take less than the process group's timeout (30 minutes by default).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

import safegeom.audit.folder as folder_mod
from safegeom.artifacts import check_output_dir, save_parquet, write_json
from safegeom.audit.config import AuditConfig
from safegeom.audit.inputs import AuditInputs, AuditTarget, check_prompt_sets, resolve_inputs
from safegeom.audit.result import AuditResult
from safegeom.audit.schema import frame
from safegeom.errors import SafegeomError
from safegeom.models.loading import LoadConfig, LoadedModel, load_model
from safegeom.outputs import claims_folder
from safegeom.parallel.dispatch import shards
from safegeom.parallel.ranks import (
    all_or_none,
    alone,
    broadcast,
    collect,
    is_main,
    main_only,
    shard,
    world_size,
)
from safegeom.threads import choose_threads, torch_threads

__all__ = ["audit"]


def _task(config: AuditConfig, inputs: AuditInputs) -> Any:
    """The task of task_accuracy: the config's (an error if bad), else the run's (a warning)."""
    from safegeom.training.tasks import get_task

    if "behaviour" not in config.families and not config.interference:
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
    """Load the saved Reference back, or build it from the base and save it atomically.

    Run by rank 0 alone (:func:`alone`: the selection's statistics are then one process's).

    Returns:
        ``(reference, seconds spent building it)`` (0.0 when it was loaded back).
    """
    import safegeom.audit.reference as reference_mod

    folder = out / "reference"
    if folder.is_dir():
        return reference_mod.load_reference(folder), 0.0
    start = time.perf_counter()
    with alone():
        ref = reference_mod.build_reference(base.get(), config, progress=progress)
    tmp = out / ".reference.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ref.save(tmp)
    os.replace(tmp, folder)
    return ref, time.perf_counter() - start


def _measure(
    target: AuditTarget,
    base: _Base,
    references: tuple[Any, dict[str, Any]],
    config: AuditConfig,
    load: LoadConfig,
    task: Any,
    progress: bool,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Measure one model, this rank alone (its captures and evaluations shard nothing), against
    ``references``: the base's Reference and the anchors' by name.

    Returns:
        ``(facts, rows)``: the checkpoint's record (step, weight hash, seconds, forward passes)
        and its schema rows; nothing is written here.
    """
    import torch

    import safegeom.audit.measure as measure_mod

    with alone():
        is_base = target is base.target
        start = time.perf_counter()
        if target.base is not None:  # the audit's base, for an adapter that names another
            load = dataclasses.replace(load, adapter_base=target.base)
        lm = base.get() if is_base else load_model(target.path, load)
        load_s = base.seconds if is_base else time.perf_counter() - start
        reference, anchors = references
        extra = {"anchors": anchors} if anchors else {}  # none: the call as before anchors
        measured = measure_mod.measure_checkpoint(
            lm, reference, config, base=base.get(), task=task, progress=progress, **extra
        )
    rows = [{**row, "checkpoint": target.label, "step": target.step} for row in measured.rows]
    facts = {
        "label": target.label,
        "step": target.step,
        "path": target.path,
        "form": target.form,
        "weight_hash": lm.weight_hash,
        "seconds": {"load": load_s, **{k: float(v) for k, v in measured.seconds.items()}},
        "forward_passes": int(measured.forward_passes),
        "threads": torch.get_num_threads(),
    }
    return facts, frame(rows)


def _write(
    out: Path,
    measured: Sequence[tuple[dict[str, Any], pd.DataFrame] | None],
    manifest: Callable[[], dict[str, Any]],
) -> int:
    """Write each measured checkpoint's facts, then its rows (atomically, rows last), in the
    order given (step order), then the manifest (``manifest()``, read after the rows).

    Returns:
        How many checkpoints were written (``None`` entries, failed or idle ranks, are skipped).
    """
    done = [m for m in measured if m is not None]
    for facts, rows in done:
        write_json(out / "checkpoints" / f"{facts['label']}.json", facts)
        save_parquet(out / "checkpoints" / f"{facts['label']}.parquet", rows)
    write_json(out / "manifest.json", manifest())
    return len(done)


def _say_skipped(out: Path, inputs: AuditInputs, todo: Sequence[AuditTarget]) -> None:
    """On a resumed audit, print one line on stderr naming the checkpoints already measured."""
    pending = {t.label for t in todo}
    done = [t.label for t in inputs.targets if t.label not in pending]
    if done:
        print(
            f"audit {out}: resuming; skipped {len(done)} checkpoint(s) already measured: "
            + ", ".join(done),
            file=sys.stderr,
        )


def _raise(error: Exception | None) -> None:
    """Raise ``error`` (this rank's failure of the round), if any."""
    if error is not None:
        raise error


@shards  # under a launcher the library's leaves run their sharded twins (safegeom.parallel)
@claims_folder("audit", inputs=("targets_or_spec", "base"))  # locks and records out
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
        overwrite: replace an audit in ``out`` made with other settings (only the files
            safegeom wrote there are deleted), or write into a folder holding the user's files.
        progress: show a progress bar over the checkpoints.

    Under a launcher every rank calls it, with the same arguments (module docstring).

    Returns:
        The :class:`AuditResult` (also saved in ``out``; :func:`load_audit` reads it back), the
        same on every rank.

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
    folder = Path(main_only(check_output_dir)(out) or out)
    if isinstance(targets_or_spec, AuditInputs):
        inputs = targets_or_spec
    else:
        paths = [targets_or_spec] if isinstance(targets_or_spec, (str, Path)) else targets_or_spec
        inputs = all_or_none(resolve_inputs, list(paths), base=base, load=load)
    all_or_none(check_prompt_sets, config)
    if config.attacks:  # a missing or corrupt attack set fails before any work
        from safegeom.audit.transfer_rows import check_replayable, load_attack_sets

        all_or_none(load_attack_sets, config.attacks)
    with warnings.catch_warnings():
        if not is_main():  # the task's warning is printed once
            warnings.simplefilter("ignore")
        task = all_or_none(_task, config, inputs)
    threads = choose_threads(config.threads).threads
    run = folder_mod.AuditRun(
        folder, folder_mod.identity(config, load, inputs), inputs, task, config, threads
    )
    labels = broadcast(main_only(folder_mod.start)(run, overwrite))
    todo = [t for t in inputs.targets if t.label in set(labels or ())]
    main_only(_say_skipped)(folder, inputs, todo)
    reference_s = None
    if todo:
        from tqdm.auto import tqdm

        show = progress and is_main()
        base_model = _Base(inputs.base, load)
        if config.attacks:  # a set made with another tokenizer is refused before the Reference
            sets = load_attack_sets(config.attacks)
            all_or_none(lambda: check_replayable(base_model.get(), sets))
        if config.anchors:  # an anchor unlike the base is refused before anything is measured
            from safegeom.audit.anchors import anchor_references, check_anchors

            main_only(check_anchors)(folder, config, load, base_model.get())
        with torch_threads(threads):
            built = broadcast(main_only(_reference)(folder, base_model, config, show))
            anchors = broadcast(
                main_only(anchor_references)(folder, config, load, progress=show, isolated=alone)
                if config.anchors
                else {}
            )
        assert built is not None and anchors is not None  # rank 0's, on every rank
        reference, reference_s = built
        bar = tqdm(
            total=len(inputs.targets),
            initial=len(inputs.targets) - len(todo),
            desc="audit",
            unit="ckpt",
            disable=not show,
        )
        mine = [todo[i] for i in shard(len(todo))]
        for k in range(-(-len(todo) // world_size())):  # rounds of one checkpoint per rank
            result, error = None, None
            if k < len(mine):
                bar.set_postfix_str(mine[k].label)
                try:
                    with torch_threads(threads):
                        result = _measure(
                            mine[k], base_model, (reference, anchors), config, load, task, show
                        )
                except Exception as err:  # reported to every rank once the round is written
                    error = err
            measured = collect(result, to="main") or []
            written = main_only(_write)(
                folder, measured, partial(folder_mod.manifest, run, reference_s, False)
            )
            all_or_none(_raise, error)
            reference_s = None
            bar.update(written or 0)
        bar.close()
    finished = main_only(folder_mod.finish)(run, reference_s)
    if world_size() == 1:
        assert finished is not None
        return finished
    shared = broadcast(None if finished is None else (finished.table, folder_mod.thawed(finished)))
    assert shared is not None  # rank 0's, on every rank
    return finished or AuditResult(table=shared[0], manifest=shared[1], root=folder)
