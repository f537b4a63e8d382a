"""The audit's geometry CIs, noise-floor rows, floor-effect flags and units on a tiny random Llama:
every geometry row has a CI around its value, every drift/angle/coupling row a floor row at its
checkpoint and layer, the floors match their analytic nulls, the causal cells carry their
un-intervened score and a saturation flag, and adding all this changes no existing value."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from safegeom.audit import geometry_rows as geometry_module
from safegeom.audit.causal_rows import saturated
from safegeom.audit.config import AuditConfig
from safegeom.audit.measure import measure_checkpoint
from safegeom.audit.reference import Reference, build_reference
from safegeom.audit.schema import UNITS, frame
from safegeom.errors import SafegeomError
from safegeom.models import load_model

CONFIG = AuditConfig(
    n_per_class=8,
    n_val=4,
    n_behaviour=4,
    cone_k=2,
    n_resamples=200,
    generate=False,
    xstest=False,
    behaviour_harmful=("advbench:test",),
)

GEOMETRY = (
    "direction_drift",
    "cosine_to_base",
    "principal_angle_max",
    "grassmann_distance",
    "hr_coupling",
    "effective_rank",
    "coordinate_separation",
    "coordinate_imbalance",
    "projection_separation",
)
FLOORED = (
    "direction_drift",
    "cosine_to_base",
    "principal_angle_max",
    "grassmann_distance",
    "hr_coupling",
)
IDENTITY = ["layer", "carrier", "source", "prompts", "metric"]


def measure(lm, ref: Reference) -> pd.DataFrame:
    rows = measure_checkpoint(lm, ref, CONFIG, base=lm, progress=False).rows
    return frame({**r, "checkpoint": "c", "step": 0} for r in rows)


@pytest.fixture(scope="module")
def lm(checkpoints: dict[str, Path], one_thread: None):
    return load_model(checkpoints["llama"])


@pytest.fixture(scope="module")
def ref(lm) -> Reference:
    return build_reference(lm, CONFIG, progress=False)


@pytest.fixture(scope="module")
def df(lm, ref: Reference) -> pd.DataFrame:
    return measure(lm, ref)


def test_every_geometry_row_has_a_ci_around_its_value(df: pd.DataFrame) -> None:
    rows = df[df.metric.isin(GEOMETRY) & df.source.isin(["fixed", "reextracted"])]
    assert set(rows.metric) == set(GEOMETRY)
    assert rows.ci_low.notna().all() and rows.ci_high.notna().all()
    assert (rows.ci_low <= rows.value + 1e-12).all() and (rows.ci_high >= rows.value - 1e-12).all()
    # re-extracting from 8 prompts per class is noisy: the CIs are not points
    drift = rows[(rows.metric == "direction_drift") & (rows.carrier == "refusal")]
    assert (drift.ci_high - drift.ci_low > 1e-4).all()
    # the base against itself: drift 0 sits on its CI's lower edge
    np.testing.assert_allclose(drift.ci_low, 0.0, atol=1e-12)


def test_floor_rows_per_layer_for_every_drift_angle_and_coupling_row(df: pd.DataFrame) -> None:
    own = df[df.metric.isin(FLOORED) & (df.source == "reextracted")]
    floors = df[df.source == "floor"]
    assert set(floors.metric) == set(FLOORED)
    assert sorted(map(tuple, own[["metric", "layer", "carrier"]].to_numpy())) == sorted(
        map(tuple, floors[["metric", "layer", "carrier"]].to_numpy())
    )
    assert floors.note.notna().all() and floors.unit.notna().all()
    assert (floors.ci_low <= floors.value).all() and (floors.value <= floors.ci_high).all()
    half = floors[floors.metric != "hr_coupling"]
    assert half.note.str.startswith("split-half").all() and (half.n == 4 + 4).all()
    drift = half[half.metric == "direction_drift"]
    assert (drift.value > 1e-6).all()  # two half-sample carriers never agree exactly


def test_coupling_floors_match_their_random_direction_nulls(lm, df: pd.DataFrame) -> None:
    floors = df[(df.source == "floor") & (df.metric == "hr_coupling")]
    assert floors.note.str.startswith("random directions").all() and floors.n.isna().all()
    d = lm.d_model
    # |cos| of a random direction with a fixed one: E = Γ(d/2) / (√π Γ((d+1)/2))
    expected_hr = math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)
    hr = floors[floors.carrier == "hr"].value
    np.testing.assert_allclose(hr, expected_hr, rtol=0.2)
    # squared cosine with a k-dim subspace: Beta(k/2, (d−k)/2), mean k/d
    cone = floors[floors.carrier == "hr-cone"].value
    np.testing.assert_allclose(cone, CONFIG.cone_k / d, rtol=0.25)


def test_uninformative_rows_are_dropped_and_units_are_everywhere(df: pd.DataFrame) -> None:
    sep = df[df.metric == "coordinate_separation"]
    assert set(sep[sep.source == "reextracted"].carrier) == {"cone[0]"}
    assert set(sep[sep.source == "fixed"].carrier) == {"cone[0]", "cone[1]"}
    assert df.unit.notna().all()
    assert (df.unit == df.metric.map(UNITS)).all()
    assert set(df[df.metric == "principal_angle_max"].unit) == {"radians"}


def test_causal_cells_carry_their_base_score_and_a_saturation_flag(df: pd.DataFrame) -> None:
    causal = df[df.metric.str.startswith(("ablation_", "addition_"))]
    assert (
        causal.saturated.notna().all() and df[~df.index.isin(causal.index)].saturated.isna().all()
    )
    for op in ("ablation", "addition"):
        for source in ("fixed", "reextracted"):
            cell = causal[causal.metric.str.startswith(op) & (causal.source == source)]
            base = cell[cell.metric == f"{op}_base"].value.item()
            flag = saturated(op, base, CONFIG.saturation_margin)
            assert (cell.saturated == flag).all() and len(cell) == 5


def test_saturation_rule_and_its_errors() -> None:
    assert saturated("ablation", -5.7, 0.02)  # σ(−5.7) ≈ 0.003: nothing left to remove
    assert not saturated("ablation", -3.0, 0.02)  # σ(−3) ≈ 0.047
    assert saturated("addition", 4.0, 0.02) and not saturated("addition", 3.0, 0.02)
    assert saturated("ablation", -1e6, 0.02)
    with pytest.raises(SafegeomError, match="use ablation or addition"):
        saturated("steer", 0.0, 0.02)


def test_cis_and_floors_change_no_existing_value(lm, ref: Reference, df, monkeypatch) -> None:
    monkeypatch.setattr(geometry_module, "geometry_samples", lambda *a, **k: {})
    monkeypatch.setattr(geometry_module, "floor_rows", lambda *a, **k: [])
    without = measure(lm, ref)
    kept = df[df.source.ne("floor").fillna(True)]
    assert len(kept) == len(without)
    merged = without.merge(kept, on=IDENTITY, suffixes=("", "_after"), validate="one_to_one")
    assert len(merged) == len(without)
    np.testing.assert_array_equal(merged.value_after, merged.value)
    had = merged.ci_low.notna()  # the CIs that existed before (projection separation, causal)
    assert had.any()
    np.testing.assert_array_equal(merged.ci_low_after[had], merged.ci_low[had])
    np.testing.assert_array_equal(merged.ci_high_after[had], merged.ci_high[had])
