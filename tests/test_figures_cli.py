"""``safegeom figures``: saved audit folders in, every figure as PNG and PDF out."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pandas as pd
import pytest

from safegeom.artifacts import save_parquet, write_json
from safegeom.audit.result import FORMAT
from safegeom.audit.schema import frame
from safegeom.cli import main
from safegeom.errors import SafegeomError
from safegeom.figure_files import read_tables, run_labels, save_figure, write_figures
from safegeom.outputs import RECORD
from safegeom.plots import FIGURES, plot_subspace
from tests.test_plots import synthetic_audit, two_runs

DRAWN = [name for name, spec in FIGURES.items() if not spec.anchored]
"""The figures of an audit without anchors (the synthetic ones here)."""


def save_audit(folder: Path, table: pd.DataFrame) -> Path:
    """An audit folder the way safegeom.audit.runner leaves a finished one."""
    save_parquet(folder / "audit.parquet", table)
    write_json(folder / "manifest.json", {"format": FORMAT, "complete": True, "config": {}})
    return folder


@pytest.fixture()
def audits(tmp_path: Path) -> list[Path]:
    runs = two_runs()
    return [save_audit(tmp_path / name, table) for name, table in runs.items()]


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} - {RECORD}  # the record of what safegeom wrote


def test_writes_every_figure_in_both_formats(
    audits: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "figs"
    assert main(["figures", *map(str, audits), "--out", str(out), "--no-progress"]) == 0
    expected = {f"{name}.{fmt}" for name in DRAWN for fmt in ("png", "pdf")}
    assert _names(out) == expected  # no temporary file left behind
    for name in DRAWN:
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"wrote {out / name}" for name in sorted(expected, key=_order)]


def _order(name: str) -> tuple[int, int]:
    stem, fmt = name.rsplit(".", 1)
    return list(FIGURES).index(stem), ("png", "pdf").index(fmt)


def test_labels_formats_and_json(
    audits: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "figs"
    argv = [
        "figures",
        *map(str, audits),
        "--out",
        str(out),
        "--labels",
        "A,B",
        "--formats",
        "svg",
        "--json",
        "--no-progress",
    ]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runs"] == {"A": str(audits[0]), "B": str(audits[1])}
    assert report["skipped"] == {}
    assert [Path(p).name for p in report["written"]] == [f"{name}.svg" for name in DRAWN]
    assert (out / "fig4_subspace.svg").read_text().lstrip().startswith("<?xml")


def test_a_geometry_only_audit_skips_behaviour_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = save_audit(tmp_path / "geo", synthetic_audit(behaviour=False))
    out = tmp_path / "figs"
    assert main(["figures", str(folder), "--out", str(out), "--formats", "png"]) == 0
    assert _names(out) == {f"{name}.png" for name in DRAWN if name != "fig1_behaviour"}
    printed = capsys.readouterr().out
    assert (
        "skipped fig1_behaviour: no asr, over_refusal, task_accuracy, cross_entropy rows in the "
        in (printed)
    )
    assert "--no-generate" in printed


def test_an_audit_with_nothing_to_draw_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    table = frame([{"checkpoint": "base", "step": 0, "metric": "kl_to_base", "value": 0.0}])
    folder = save_audit(tmp_path / "bare", table)
    assert main(["figures", str(folder), "--out", str(tmp_path / "figs")]) == 2
    assert "the audits hold no rows any figure draws" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--labels", "one"], "labels (--labels) needs one label per audit folder (2)"),
        (["--labels", "x,x"], "labels (--labels) must be distinct"),
        (["--formats", "png,jpg"], "formats (--formats) must be among png, pdf, svg"),
    ],
)
def test_bad_options_fail_with_their_message(
    audits: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    extra: list[str],
    message: str,
) -> None:
    out = tmp_path / "figs"
    assert main(["figures", *map(str, audits), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_out_is_checked_before_the_audits_are_read(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["figures", str(tmp_path / "nowhere"), "--out", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert f"--out {blocker} is a file; give a folder" in err  # not the missing audit


def test_a_missing_or_unfinished_audit_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = str(tmp_path / "figs")
    assert main(["figures", str(tmp_path / "nowhere"), "--out", out]) == 2
    assert f"no audit folder at {tmp_path / 'nowhere'}" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["figures", str(tmp_path / "empty"), "--out", out]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err


def test_audit_folders_are_required(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["figures", "--out", "x"])
    assert "AUDIT_DIR" in capsys.readouterr().err


def test_default_labels_are_folder_names_made_distinct(tmp_path: Path) -> None:
    assert run_labels([tmp_path / "lora", tmp_path / "defended"]) == ("lora", "defended")
    clash = run_labels([tmp_path / "a" / "audit", tmp_path / "b" / "audit"])
    assert clash == ("a/audit", "b/audit")
    assert len(set(run_labels([tmp_path / "x", tmp_path / "x"]))) == 2


def test_read_tables_keys_by_label(audits: list[Path]) -> None:
    tables = read_tables(audits)
    assert list(tables) == ["LoRA", "defended"]
    assert tables["LoRA"].equals(two_runs()["LoRA"])
    with pytest.raises(SafegeomError, match="give one label per audit folder: 1 for 2"):
        read_tables(audits, ["only"])


def test_save_figure_is_atomic_and_reproducible(tmp_path: Path) -> None:
    fig = plot_subspace(synthetic_audit())
    first = save_figure(fig, tmp_path / "a.pdf").read_bytes()
    assert save_figure(fig, tmp_path / "b.pdf").read_bytes() == first  # no creation date
    with pytest.raises(SafegeomError, match="format 'jpg' is not one of"):
        save_figure(fig, tmp_path / "c.jpg")
    assert _names(tmp_path) == {"a.pdf", "b.pdf"}


def test_write_figures_returns_written_and_skipped(tmp_path: Path) -> None:
    written, skipped = write_figures(
        {"geo": synthetic_audit(behaviour=False)}, tmp_path, formats=("png",)
    )
    assert [p.name for p in written] == [f"{n}.png" for n in DRAWN if n != "fig1_behaviour"]
    assert list(skipped) == ["fig1_behaviour"]  # no anchors: figure 9 is not missed


@pytest.mark.parametrize("name", list(FIGURES))
def test_each_figures_script_writes_its_figure(
    name: str, audits: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = Path(__file__).parents[1] / "figures" / f"{name}.py"
    out = tmp_path / f"{name}.png"
    argv = [str(script), *map(str, audits), "--labels", "A,B", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_figures_script_bad_input_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from safegeom.figure_files import figure_script

    assert (
        figure_script(
            "fig4_subspace", [str(tmp_path / "nowhere"), "--out", str(tmp_path / "f.png")]
        )
        == 2
    )
    assert capsys.readouterr().err.strip() == (
        f"figures/fig4_subspace.py: error: no audit folder at {tmp_path / 'nowhere'}"
    )
    metric = {"metric": ("cosine_to_base", "direction_drift")}
    argv = ["x", "--metric", "direction_drift", "--out", str(tmp_path)]
    drift = figure_script("fig2_drift", argv, choices=metric)
    assert drift == 2
    assert "is a folder; give a file path" in capsys.readouterr().err


def test_figures_readme_lists_every_script() -> None:
    folder = Path(__file__).parents[1] / "figures"
    readme = (folder / "README.md").read_text()
    scripts = sorted(p.name for p in folder.glob("fig*.py"))
    study = ["fig7_defences.py"]  # the defence study's figure: from its results, not an audit
    assert scripts == sorted([*(f"{name}.py" for name in FIGURES), *study])
    assert all(f"`{s}`" in readme for s in scripts)
