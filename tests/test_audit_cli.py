"""``safegeom audit``: writes and summarises, resumes, and bad inputs exit 2 with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from safegeom.audit import load_audit
from safegeom.cli import main
from tests.audit_fakes import install
from tests.audit_helpers import perturbed
from tests.tiny_models import build_checkpoint

FAST = [
    "--no-generate",
    "--families",
    "geometry",
    "--no-xstest",
    "--n-per-class",
    "4",
    "--n-val",
    "4",
    "--n-resamples",
    "100",
    "--no-progress",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("cli")
    base = build_checkpoint(root, "llama")
    return [base, perturbed(base, root / "step-000005", 0.05)]


def _args(models: list[Path], out: Path, *extra: str) -> list[str]:
    return ["audit", *map(str, models), "--out", str(out), *FAST, *extra]


def test_audit_writes_and_summarises(models, tmp_path, capsys):
    assert main(_args(models, tmp_path / "a")) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'a'}/audit.parquet" in out and "manifest.json" in out
    assert "cosine_to_base" in out and "step-000005" in out
    result = load_audit(tmp_path / "a")
    assert result.checkpoints == ("base", "step-000005")
    assert result.manifest["config"]["n_per_class"] == 4


def test_audit_json_prints_records(models, tmp_path, capsys, monkeypatch):
    install(monkeypatch)
    assert main(_args(models, tmp_path / "a", "--json")) == 0
    records = json.loads(capsys.readouterr().out)
    assert {r["checkpoint"] for r in records} == {"base", "step-000005"}
    assert {"metric", "value", "ci_low", "step"} <= set(records[0])


def test_rerun_skips_and_changed_settings_need_overwrite(models, tmp_path, capsys, monkeypatch):
    calls = install(monkeypatch)
    assert main(_args(models, tmp_path / "a")) == 0
    assert main(_args(models, tmp_path / "a")) == 0
    assert len(calls.measured) == 2
    capsys.readouterr()
    assert main(_args(models, tmp_path / "a", "--seed", "3")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "other settings (seed differ); pass --overwrite to replace it" in err
    assert main(_args(models, tmp_path / "a", "--seed", "3", "--overwrite")) == 0
    assert len(calls.measured) == 4


def test_trainer_folder_with_base(models, tmp_path, capsys, monkeypatch):
    install(monkeypatch)
    for n in (10, 9):
        shutil.copytree(models[1], tmp_path / "trainer" / f"checkpoint-{n}")
    args = [
        "audit",
        str(tmp_path / "trainer"),
        "--base",
        str(models[0]),
        "--out",
        str(tmp_path / "a"),
        *FAST,
    ]
    assert main(args) == 0
    assert load_audit(tmp_path / "a").checkpoints == ("base", "checkpoint-9", "checkpoint-10")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["MISSING"], "no such folder"),
        (["GPT2"], "is a gpt2 model"),
        (["--harmful", "EMPTY"], "--harmful: prompt file"),
        (["--out", "FILE"], "is a file; give a folder"),
    ],
)
def test_bad_input_exits_2_with_one_line_before_work(
    models, tmp_path, capsys, monkeypatch, extra, message
):
    calls = install(monkeypatch)
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty.jsonl").write_text("")
    swap = {
        "MISSING": str(tmp_path / "missing"),
        "FILE": str(tmp_path / "file"),
        "EMPTY": str(tmp_path / "empty.jsonl"),
    }
    if "GPT2" in extra:
        swap["GPT2"] = str(build_checkpoint(tmp_path, "gpt2"))
    extra = [swap.get(e, e) for e in extra]
    paths = models if extra[0].startswith("--") else [models[0], extra.pop(0)]
    assert main(_args(paths, tmp_path / "a", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("safegeom audit: error:")
    assert message in err
    assert calls.measured == [] and calls.built == 0
