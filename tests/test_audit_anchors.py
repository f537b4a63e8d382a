"""Multi-anchor references in the audit (``safegeom audit ... --anchor NAME=MODEL``): an anchor's
rows equal an audit with that anchor as its base, the default audit's geometry rows say ``base``,
an anchor unlike the base is refused in one line, and a rerun continues only with the same
anchors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from safegeom.audit import AuditConfig, load_audit
from safegeom.audit.schema import ANCHORED, frame, with_anchor
from safegeom.cli import main
from safegeom.errors import ConfigError
from safegeom.figure_files import write_figures
from safegeom.models import tiny_chat_path
from safegeom.plots import has_data, plot_anchors, plot_coupling
from tests.audit_helpers import perturbed
from tests.tiny_models import build_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

AUDIT = ["--families", "geometry", "--no-interference", "--no-generate"]
AUDIT += ["--n-per-class", "8", "--n-val", "8", "--n-resamples", "100", "--batch-size", "4"]
AUDIT += ["--no-progress", "--device", "cpu"]
KEYS = ["layer", "carrier", "source", "prompts", "metric", "note"]
NUMBERS = ["value", "ci_low", "ci_high", "n"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A checkpoint and an anchor (both tiny-chat plus noise), audited with the anchor, and the
    same checkpoint audited with the anchor as its base."""
    root = tmp_path_factory.mktemp("anchors")
    step = perturbed(tiny_chat_path(), root / "step-000010", scale=0.004, seed=1)
    anchor = perturbed(tiny_chat_path(), root / "seed2", scale=0.002, seed=2)
    out = root / "audit"
    args = ["audit", "tiny-chat", str(step), "--out", str(out), *AUDIT]
    assert main([*args, "--anchor", f"seed2={anchor}"]) == 0
    alone = root / "alone"
    assert main(["audit", str(anchor), str(step), "--out", str(alone), *AUDIT]) == 0
    return {"root": root, "out": out, "alone": alone, "anchor": anchor, "step": step, "args": args}


def _geometry(table: pd.DataFrame, anchor: str, checkpoint: str) -> pd.DataFrame:
    rows = table[(table.anchor == anchor) & (table.checkpoint == checkpoint)]
    return rows.sort_values(KEYS, na_position="first")[KEYS + NUMBERS].reset_index(drop=True)


def test_anchor_rows_equal_an_audit_with_that_anchor_as_base(setup) -> None:
    table = load_audit(setup["out"]).table
    alone = load_audit(setup["alone"]).table
    assert set(table.anchor.dropna()) == {"base", "seed2"}
    mine = _geometry(table, "seed2", "step-000010")
    theirs = _geometry(alone, "base", "step-000010")
    assert len(mine) > 50
    pd.testing.assert_frame_equal(mine, theirs)  # bit for bit: one thread, same batches
    drift = mine[(mine.metric == "direction_drift") & (mine.carrier == "refusal")]
    assert drift.value.max() > 0  # the checkpoint moved away from the anchor too


def test_every_geometry_row_has_an_anchor_and_the_base_rows_stay(setup) -> None:
    table = load_audit(setup["out"]).table
    assert table[table.metric.isin(ANCHORED)].anchor.notna().all()
    base = _geometry(table, "base", "base")
    cosine = base[(base.metric == "cosine_to_base") & (base.source == "reextracted")]
    assert len(cosine) > 3  # the base against itself: 1 up to float rounding (thread count)
    assert cosine.value.between(1 - 1e-6, 1 + 1e-6).all(), cosine.value.tolist()
    assert (setup["out"] / "anchors" / "seed2" / "reference.json").is_file()
    manifest = json.loads((setup["out"] / "manifest.json").read_text())
    assert manifest["identity"]["config"]["anchors"] == [f"seed2={setup['anchor']}"]


def test_default_audit_says_base_on_every_geometry_row(setup) -> None:
    table = load_audit(setup["alone"]).table
    geometry = table[table.metric.isin(ANCHORED)]
    assert len(geometry) > 50 and geometry.anchor.eq("base").all()
    assert "anchors" not in json.loads((setup["alone"] / "manifest.json").read_text())["identity"]


def test_a_table_saved_before_the_column_reads_back_with_it(setup, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(setup["alone"], old)
    table = pd.read_parquet(old / "audit.parquet").drop(columns="anchor")
    table.to_parquet(old / "audit.parquet")
    back = load_audit(old).table
    pd.testing.assert_frame_equal(back, load_audit(setup["alone"]).table)
    behaviour = frame([{"step": 0, "metric": "asr", "value": 0.5}]).drop(columns="anchor")
    assert with_anchor(behaviour).anchor.isna().all()


def test_resume_with_other_anchors_is_refused(setup, capsys) -> None:
    assert main([*setup["args"], "--anchor", f"seed2={setup['anchor']}"]) == 0  # same: resumes
    assert "skipped 2 checkpoint(s)" in capsys.readouterr().err
    for other in ([], ["--anchor", f"seed3={setup['anchor']}"]):
        assert main([*setup["args"], *other]) == 2
        err = capsys.readouterr().err
        assert "other settings (anchors differ)" in err and "--overwrite" in err


def _refused(setup, tmp_path: Path, model: Path, capsys) -> str:
    step = setup["step"]
    args = ["audit", "tiny-chat", str(step), "--out", str(tmp_path / "a"), *AUDIT]
    assert main([*args, "--anchor", f"odd={model}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not (tmp_path / "a" / "reference").exists()  # refused before anything was measured
    return err[-1]


def test_an_anchor_of_another_hidden_size_is_refused(setup, tmp_path: Path, capsys) -> None:
    model = build_checkpoint(tmp_path, "llama")
    err = _refused(setup, tmp_path, model, capsys)
    assert f"--anchor odd={model}: hidden size 32, the base tiny-chat has" in err
    assert "pass an aligned model of the base's architecture and tokenizer" in err


def test_an_anchor_with_another_tokenizer_is_refused(setup, tmp_path: Path, capsys) -> None:
    model = shutil.copytree(setup["anchor"], tmp_path / "retok")
    spec = json.loads((model / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]  # two ordinary tokens trade ids
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (model / "tokenizer.json").write_text(json.dumps(spec))
    err = _refused(setup, tmp_path, model, capsys)
    assert f"--anchor odd={model}: its tokenizer is not the base tiny-chat's" in err


def test_an_anchor_with_another_chat_template_is_refused(setup, tmp_path: Path, capsys) -> None:
    model = shutil.copytree(setup["anchor"], tmp_path / "retemplate")
    template = next(model.glob("chat_template.jinja"), None)
    assert template is not None
    template.write_text("{# another template #}" + template.read_text())
    err = _refused(setup, tmp_path, model, capsys)
    assert f"--anchor odd={model}: its chat template is not the base tiny-chat's" in err


@pytest.mark.parametrize(
    ("anchors", "message"),
    [
        ("seed2", "anchors (--anchor) takes NAME=MODEL"),
        ("base=tiny-chat", "cannot use the name 'base'"),
        (("a=tiny-chat", "a=x"), "names each anchor once"),
    ],
)
def test_bad_anchor_specs_fail_in_one_line(anchors, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        AuditConfig(anchors=anchors)
    assert AuditConfig(anchors={"s1": "m1"}).anchors == ("s1=m1",)


def test_the_anchor_figures(setup, tmp_path: Path) -> None:
    table = load_audit(setup["out"]).table
    alone = load_audit(setup["alone"]).table
    assert has_data(table, "fig9_anchors") and not has_data(alone, "fig9_anchors")
    written, skipped = write_figures({"run": table}, tmp_path, formats=("png",))
    assert tmp_path / "fig9_anchors.png" in written and "fig9_anchors" not in skipped
    _, skipped = write_figures({"run": alone}, tmp_path / "alone", formats=("png",))
    assert "fig9_anchors" not in skipped  # an audit without anchors misses nothing
    skipped = write_figures({"run": table[table.metric != "hr_coupling"]}, tmp_path / "c")[1]
    assert "fig9_anchors" not in skipped
    only = {"run": table[~table.metric.isin(["cosine_to_base", "hr_coupling"])]}
    assert (
        "rows measured against an anchor" in write_figures(only, tmp_path / "d")[1]["fig9_anchors"]
    )
    fig = plot_anchors(table)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 3 and all(titles)
    labels = {line.get_label() for ax in fig.axes[:2] for line in ax.get_lines()}
    assert {"base", "seed2"} <= labels
    coupling = plot_coupling(table)  # the line plots group by anchor as by variant
    lines = {line.get_label() for line in coupling.axes[0].get_lines()}
    assert any("seed2" in label for label in lines) and any("base" in label for label in lines)


def test_the_wide_view_keys_anchors_where_there_are_several(setup) -> None:
    result = load_audit(setup["out"])
    wide = result.wide("step-000010")
    assert list(wide.columns[:5]) == ["layer", "carrier", "source", "anchor", "prompts"]
    assert set(wide.anchor) == {"base", "seed2"}
    assert "anchor" not in load_audit(setup["alone"]).wide("step-000010").columns
