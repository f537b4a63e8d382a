"""The audit under a launcher: two CPU processes over gloo write the table one process writes.

``safegeom audit`` runs as two ranks (``tests/distributed_worker.py audit``, with the environment a
launcher sets) on a tiny random Llama and three checkpoints drifting away from it, every family
on (geometry, causal, behaviour with generation: captures, sweeps and evaluations inside each
checkpoint); the same command in this (single) process is the reference. Each worker logs every
path it wrote, made or renamed, and the models it measured.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from safegeom.cli import main
from safegeom.outputs.record import RECORD
from tests.audit_helpers import perturbed
from tests.launch_helpers import launch
from tests.tiny_models import build_checkpoint

ARGS = [
    "--families",
    "geometry,causal,behaviour",
    "--n-per-class",
    "4",
    "--n-val",
    "4",
    "--n-behaviour",
    "2",
    "--max-new-tokens",
    "3",
    "--no-xstest",
    "--n-resamples",
    "100",
    "--behaviour-harmful",
    "advbench:test",
    "--behaviour-harmless",
    "alpaca:test",
    "--no-progress",
]
"""A small real audit: every family, two prompts per behaviour set."""


def _nan_checkpoint(source: Path, dest: Path) -> Path:
    """A copy of ``source`` whose first weight matrix is NaN (it loads, its activations do not)."""
    shutil.copytree(source, dest)
    file = dest / "model.safetensors"
    tensors = load_file(str(file))
    name = next(k for k in sorted(tensors) if tensors[k].ndim == 2)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(file), metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """BASE and three checkpoints, a NaN checkpoint, and their one-process audit."""
    root = tmp_path_factory.mktemp("audit-sharded")
    torch.set_num_threads(1)
    base = build_checkpoint(root, "llama")
    steps = [perturbed(base, root / f"step-{s:06d}", 0.02 * s, seed=s) for s in (1, 2, 3)]
    nan = _nan_checkpoint(steps[0], root / "step-000004")
    assert main(["audit", str(base), *map(str, steps), "--out", str(root / "one"), *ARGS]) == 0
    return {"root": root, "paths": [str(base), *map(str, steps)], "nan": str(nan)}


def _run(models: dict[str, Any], out: Path, paths: list[str]) -> list[dict[str, Any]]:
    """``safegeom audit PATHS --out OUT`` as two ranks: per rank its exit status, stdout, stderr,
    the paths it wrote under the test's folder, and the models it measured."""
    work = out.parent / f"{out.name}-work"
    work.mkdir()
    args = ["audit", str(work), "audit", *paths, "--out", str(out), *ARGS]
    runs = []
    for r, (code, stdout, stderr) in enumerate(launch("tests.distributed_worker", args, work)):
        log = work / f"audit-rank{r}.json"
        assert log.is_file(), f"rank {r} exited {code}:\n{stderr[-4000:]}"
        record = json.loads(log.read_text())
        root = str(models["root"])
        writes = [p for p in record["writes"] if p.startswith(root) and not p.startswith(str(work))]
        runs.append(
            {
                "code": code,
                "status": record["code"],
                "out": stdout,
                "err": stderr,
                "writes": writes,
                "measured": record["measured"],
                "returned": record["returned"],
            }
        )
    return runs


def _table(out: Path, name: str = "audit.parquet") -> pd.DataFrame:
    return pd.read_parquet(out / name)


def test_two_processes_write_the_table_of_one(models: dict[str, Any]) -> None:
    one, two = models["root"] / "one", models["root"] / "two"
    zero, first = _run(models, two, models["paths"])
    assert zero["code"] == first["code"] == 0 and zero["status"] == first["status"] == 0, (
        zero["err"][-3000:] + first["err"][-3000:]
    )
    pd.testing.assert_frame_equal(_table(two), _table(one), check_exact=True)
    labels = ("base", "step-000001", "step-000002", "step-000003")
    for label in labels:
        name = f"checkpoints/{label}.parquet"
        pd.testing.assert_frame_equal(_table(two, name), _table(one, name), check_exact=True)
    assert set(_table(one)["metric"]) >= {"cosine_to_base", "ablation_effect", "asr"}
    # the checkpoints were dealt round robin: each rank measured its own (and loaded the base)
    paths = models["paths"]
    assert zero["measured"] == [paths[0], paths[2]] and first["measured"] == [paths[1], paths[3]]
    manifests = [json.loads((o / "manifest.json").read_text()) for o in (one, two)]
    assert manifests[1]["complete"] is True
    for key in ("label", "step", "weight_hash", "forward_passes"):
        assert [c[key] for c in manifests[1]["checkpoints"]] == [
            c[key] for c in manifests[0]["checkpoints"]
        ]
    assert [c["label"] for c in manifests[1]["checkpoints"]] == list(labels)  # step order
    # audit() returns the same result on every rank
    table_hash = int(pd.util.hash_pandas_object(_table(one)).sum())
    for rank in (zero, first):
        assert rank["returned"] == {
            "hash": table_hash,
            "checkpoints": list(labels),
            "complete": True,
        }
    # rank 0 alone writes (even the folder) and prints
    assert first["writes"] == [] and first["out"] == ""
    assert str(two / "audit.parquet") in zero["writes"] and str(two) in zero["writes"]
    assert zero["out"].count(f"wrote {two}/audit.parquet") == 1


def test_resumed_two_process_audit_equals_uninterrupted(models: dict[str, Any]) -> None:
    """A one-process audit left with two of its four checkpoints done, continued by two."""
    one, out = models["root"] / "one", models["root"] / "resumed"
    shutil.copytree(one, out)
    for label in ("step-000001", "step-000003"):
        (out / "checkpoints" / f"{label}.parquet").unlink()
    (out / "audit.parquet").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    kept = {n: (out / "checkpoints" / n).read_bytes() for n in ("base.json", "step-000002.json")}
    zero, first = _run(models, out, models["paths"])
    assert zero["code"] == first["code"] == 0, zero["err"][-3000:] + first["err"][-3000:]
    pd.testing.assert_frame_equal(_table(out), _table(one), check_exact=True)
    paths = models["paths"]
    assert zero["measured"] == [paths[1]] and first["measured"] == [paths[3]]  # only the missing
    assert all((out / "checkpoints" / n).read_bytes() == b for n, b in kept.items())
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    assert first["writes"] == []


def test_failure_on_rank_one_stops_both_with_its_message(models: dict[str, Any]) -> None:
    """The base (rank 0) and a NaN checkpoint (rank 1) against the saved reference of ``one``."""
    out = models["root"] / "failed"
    out.mkdir()
    shutil.copytree(models["root"] / "one" / "reference", out / "reference")
    shutil.copy(models["root"] / "one" / "manifest.json", out / "manifest.json")
    shutil.copy(models["root"] / "one" / RECORD, out / RECORD)  # safegeom's own files, so kept
    zero, first = _run(models, out, [models["paths"][0], models["nan"]])
    assert zero["code"] == first["code"] == 0 and zero["status"] == first["status"] == 2
    prefix = "safegeom audit: error: "
    own = first["err"].strip().splitlines()[-1]
    assert own.startswith(prefix) and "NaN" in own, first["err"][-3000:]
    message = own.removeprefix(prefix)
    assert zero["err"].strip().splitlines()[-1] == f"{prefix}rank 1 of 2 failed: {message}"
    # rank 1 refuses the NaN checkpoint when it loads it, before measuring anything
    assert zero["measured"] == [models["paths"][0]] and first["measured"] == []
    # the round's good checkpoint is kept (a rerun continues from it); nothing else is written
    assert (out / "checkpoints" / "base.parquet").is_file()
    assert not (out / "checkpoints" / "step-000004.parquet").exists()
    assert not (out / "audit.parquet").exists() and first["writes"] == []
