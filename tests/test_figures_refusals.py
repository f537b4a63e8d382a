"""``safegeom figures`` does not draw silently wrong pictures: audits of different base models
are overlaid with a warning, and metrics whose values are all NaN count as missing."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from safegeom.artifacts import save_parquet, write_json
from safegeom.audit.result import FORMAT
from safegeom.cli import main
from safegeom.figure_files import all_nan_metrics, read_tables, write_figures
from safegeom.plots import FIGURES
from tests.test_plots import synthetic_audit


def _audit(folder: Path, table: pd.DataFrame, base: str, base_hash: str | None) -> Path:
    save_parquet(folder / "audit.parquet", table)
    manifest = {"format": FORMAT, "complete": True, "config": {}, "identity": {"base": base}}
    write_json(folder / "manifest.json", {**manifest, "base_hash": base_hash})
    return folder


def test_different_bases_warn(tmp_path: Path) -> None:
    a = _audit(tmp_path / "a", synthetic_audit(), "models/llama", "h1")
    b = _audit(tmp_path / "b", synthetic_audit(seed=1), "models/qwen", "h2")
    with pytest.warns(
        UserWarning, match=r"different base models \(a: models/llama; b: models/qwen"
    ):
        read_tables([a, b])


def test_same_base_by_hash_does_not_warn(tmp_path: Path) -> None:
    a = _audit(tmp_path / "a", synthetic_audit(), "/here/llama", "h1")
    b = _audit(tmp_path / "b", synthetic_audit(seed=1), "/there/llama", "h1")  # moved, same weights
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(read_tables([a, b])) == ["a", "b"]


def test_all_nan_audit_draws_nothing_and_names_why(tmp_path: Path, capsys) -> None:
    table = synthetic_audit().assign(value=np.nan)
    folder = _audit(tmp_path / "nan", table, "m", "h")
    written, skipped = write_figures(read_tables([folder]), tmp_path / "figs", formats=("png",))
    assert written == [] and set(skipped) == {n for n, s in FIGURES.items() if not s.anchored}
    assert all("rows are all NaN" in why for why in skipped.values())
    assert main(["figures", str(folder), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the audits hold no rows any figure draws" in err and "all NaN" in err


def test_one_all_nan_metric_is_missing_and_the_rest_drawn(tmp_path: Path) -> None:
    table = synthetic_audit()
    behaviour = FIGURES["fig1_behaviour"].metrics
    table.loc[table["metric"].isin(behaviour), "value"] = np.nan
    assert all_nan_metrics({"run": table}) == set(table["metric"][table["metric"].isin(behaviour)])
    written, skipped = write_figures({"run": table}, tmp_path, formats=("png",))
    assert list(skipped) == ["fig1_behaviour"] and "all NaN" in skipped["fig1_behaviour"]
    assert len(written) == len(FIGURES) - 2  # figure 9 needs anchors
