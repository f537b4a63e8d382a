"""measure_checkpoint on a tiny random Llama: the base against itself, a checkpoint
orthogonalised against r₀, schema and families, determinism, and bad inputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from safegeom.audit.config import AuditConfig
from safegeom.audit.measure import PHASES, Measured, measure_checkpoint
from safegeom.audit.reference import Reference, build_reference
from safegeom.audit.schema import frame
from safegeom.errors import ArtifactError, SafegeomError
from safegeom.geometry import coupling
from safegeom.interventions import orthogonalize_weights
from safegeom.models import load_model

CONFIG = AuditConfig(
    n_per_class=8,
    n_val=4,
    n_behaviour=4,
    cone_k=2,
    n_resamples=100,
    max_new_tokens=4,
    xstest=False,
    behaviour_harmful=("advbench:test",),
)


def table(measured: Measured) -> pd.DataFrame:
    return frame({**r, "checkpoint": "c", "step": 0} for r in measured.rows)


def pick(df: pd.DataFrame, metric: str, **where: object) -> pd.DataFrame:
    out = df[df.metric == metric]
    for key, value in where.items():
        out = out[out[key] == value]
    return out


@pytest.fixture(scope="module")
def lm(checkpoints: dict[str, Path], one_thread: None):
    return load_model(checkpoints["llama"])


@pytest.fixture(scope="module")
def ref(lm) -> Reference:
    return build_reference(lm, CONFIG, progress=False)


@pytest.fixture(scope="module")
def base_rows(lm, ref: Reference) -> Measured:
    return measure_checkpoint(lm, ref, CONFIG, base=lm, task=None, progress=False)


def test_base_against_itself(ref: Reference, base_rows: Measured) -> None:
    df = table(base_rows)
    df = df[df.source.ne("floor").fillna(True)]  # noise floors are tested in test_audit_uncertainty
    drift = pick(df, "direction_drift")
    assert set(drift.carrier) == {"refusal", "harmfulness"} and len(drift) >= 4
    np.testing.assert_allclose(drift.value, 0.0, atol=1e-12)
    np.testing.assert_allclose(pick(df, "cosine_to_base").value, 1.0, atol=1e-12)
    angles = pick(df, "principal_angle_max")
    assert set(angles.layer) == {1, 2}  # no cone at the embedding layer
    np.testing.assert_allclose(angles.value, 0.0, atol=1e-6)
    np.testing.assert_allclose(pick(df, "grassmann_distance").value, 0.0, atol=1e-6)
    for row in pick(df, "hr_coupling", carrier="hr").itertuples():
        j = ref.layer_index(row.layer)
        expected = coupling(ref.harmfulness_layers[j], ref.refusal_layers[j])
        assert row.value == pytest.approx(expected, abs=1e-12)
    fixed = pick(df, "coordinate_separation", source="fixed")
    own = pick(df, "coordinate_separation", source="reextracted")
    assert list(own.carrier) == ["cone[0]"]  # cone[j ≥ 1] of one's own cone is 0 by construction
    np.testing.assert_allclose(fixed.value.iloc[0], own.value.item(), atol=1e-5)
    np.testing.assert_allclose(fixed.value.iloc[1:], 0.0, atol=1e-5)
    np.testing.assert_allclose(pick(df, "kl_to_base").value, 0.0, atol=1e-9)


def test_rows_schema_families_and_cost(base_rows: Measured) -> None:
    df = table(base_rows)
    assert {
        "direction_drift",
        "cosine_to_base",
        "principal_angle_max",
        "grassmann_distance",
        "hr_coupling",
        "effective_rank",
        "coordinate_separation",
        "projection_separation",
        "ablation_effect",
        "addition_effect",
        "ablation_raw",
        "addition_control_mean",
        "ablation_control_std",
        "refusal_rate",
        "asr",
        "over_refusal",
        "refusal_score",
        "kl_to_base",
        "cross_entropy",
    } <= set(df.metric)
    assert set(pick(df, "ablation_effect").source) == {"fixed", "reextracted"}
    assert set(pick(df, "projection_separation").source) == {"fixed", "reextracted"}
    sep = pick(df, "projection_separation")
    assert (sep.ci_low <= sep.value + 1e-9).all() and (sep.ci_high >= sep.value - 1e-9).all()
    behaviour = df[df.metric.isin(["refusal_rate", "asr", "over_refusal"])]
    assert behaviour.carrier.isna().all() and (behaviour.judge == "substring").all()
    assert set(behaviour.prompts) == {"advbench:test", "alpaca:test"}
    ce = pick(df, "cross_entropy")  # GSM8K's held-out answers, the default completion set
    assert list(ce.prompts) == ["gsm8k:test"] and ce.n.item() == 4 and ce.value.item() > 0
    assert set(base_rows.seconds) == set(PHASES) and base_rows.seconds["capture"] > 0
    assert base_rows.forward_passes > 0


def test_measuring_twice_gives_the_same_table(lm, ref: Reference, base_rows: Measured) -> None:
    again = measure_checkpoint(lm, ref, CONFIG, base=lm, task=None, progress=False)
    pd.testing.assert_frame_equal(table(again), table(base_rows))


def check_orthogonalised(base: pd.DataFrame, edited: pd.DataFrame) -> None:
    """The checks of a checkpoint whose weights were orthogonalised against r₀ (tolerances):

    - r₀ is absent from the residual stream, so ablating it changes nothing: |raw effect|
      < 1e-4 nats (float32 noise on scores of size ~1; on the base it is > 1e-2), and the
      effect − control is just minus the control mean;
    - every projection on r₀ is float noise, so the separation on r₀ is exactly 0 (the
      zero-spread rule of ``cohens_d``; on the base it is > 0.5);
    - the random controls are the same population: each control mean moves by less than two
      control standard deviations (the edit removes one of d directions from the weights).
    """
    fixed = {"source": "fixed", "carrier": "refusal"}
    raw = pick(edited, "ablation_raw", **fixed).value.item()
    assert abs(raw) < 1e-4 and abs(pick(base, "ablation_raw", **fixed).value.item()) > 1e-2
    control = pick(edited, "ablation_control_mean", **fixed).value.item()
    effect = pick(edited, "ablation_effect", **fixed).value.item()
    assert effect == pytest.approx(-control, abs=1e-4)
    assert pick(edited, "projection_separation", **fixed).value.item() == 0.0
    assert abs(pick(base, "projection_separation", **fixed).value.item()) > 0.5
    for op in ("ablation", "addition"):
        a = pick(edited, f"{op}_control_mean", **fixed).value.item()
        b = pick(base, f"{op}_control_mean", **fixed).value.item()
        spread = max(pick(t, f"{op}_control_std", **fixed).value.item() for t in (base, edited))
        assert abs(a - b) < 2 * spread, (op, a, b, spread)


def test_orthogonalised_checkpoint(lm, ref: Reference, base_rows: Measured) -> None:
    edited = orthogonalize_weights(lm, ref.refusal.vectors)
    config = dataclasses.replace(CONFIG, families=("geometry", "causal"))
    df = table(measure_checkpoint(edited, ref, config, base=lm, task=None, progress=False))
    check_orthogonalised(table(base_rows), df)
    assert "refusal_rate" not in set(df.metric)


def test_families_and_generation_switches(lm, ref: Reference) -> None:
    geometry = measure_checkpoint(
        lm, ref, dataclasses.replace(CONFIG, families=("geometry",)), base=lm, progress=False
    )
    metrics = set(table(geometry).metric)
    assert "ablation_effect" not in metrics and "refusal_score" not in metrics
    assert geometry.seconds["causal"] == 0.0
    quiet = dataclasses.replace(CONFIG, families=("behaviour",), generate=False)
    df = table(measure_checkpoint(lm, ref, quiet, base=lm, progress=False))
    assert set(df.metric) == {"refusal_score", "kl_to_base", "cross_entropy"}  # no generation


def test_task_accuracy_and_reselect(lm, ref: Reference) -> None:
    from safegeom.training.tasks import Task

    task = Task(
        name="toy",
        prompts=("a",),
        responses=("b",),
        eval_prompts=("What is 2+2?", "What is 3+3?"),
        eval_references=("4", "6"),
    )
    config = dataclasses.replace(CONFIG, families=("behaviour",), reselect=True)
    df = table(measure_checkpoint(lm, ref, config, base=lm, task=task, progress=False))
    acc = pick(df, "task_accuracy")
    assert len(acc) == 1 and acc.n.item() == 2 and 0.0 <= acc.value.item() <= 1.0
    assert acc.prompts.item() == "toy:eval" and acc.judge.item() == "exact_match"
    chosen = pick(df, "bypass_score")
    assert len(chosen) == 1 and chosen.source.item() == "reextracted"
    assert {"induce_score", "selection_kl"} <= set(df.metric)


def test_bad_inputs(lm, ref: Reference, checkpoints: dict[str, Path]) -> None:
    other = load_model(checkpoints["gpt2"])
    narrow_r0 = dataclasses.replace(ref.refusal, vectors=ref.refusal.vectors[:, :16])
    shrunk = dataclasses.replace(ref, carriers={**ref.carriers, "refusal": narrow_r0})
    with pytest.raises(ArtifactError, match="audit checkpoints of the base's architecture"):
        measure_checkpoint(other, shrunk, CONFIG, base=lm, progress=False)
    narrow = dataclasses.replace(ref, layers=(ref.refusal.layer,))
    with pytest.raises(SafegeomError, match="rebuild it with these layers"):
        measure_checkpoint(lm, narrow, CONFIG, base=lm, progress=False)


def test_cross_entropy_needs_sets_with_completions(lm, ref: Reference) -> None:
    """--completion-sets names sets with reference completions; one without them is refused."""
    config = dataclasses.replace(
        CONFIG, families=("behaviour",), generate=False, completion_sets=("alpaca:test",)
    )
    with pytest.raises(SafegeomError, match="alpaca:test has no reference completions"):
        measure_checkpoint(lm, ref, config, base=lm, progress=False)
    config = dataclasses.replace(config, completion_sets=())
    assert "cross_entropy" not in set(table(measure_checkpoint(lm, ref, config, base=lm)).metric)


def test_cohens_d_zero_spread_rule() -> None:
    from safegeom.audit.geometry_rows import cohens_d

    a, b = np.array([1.0, 2.0, 3.0]), np.array([0.0, 1.0, 2.0])
    assert cohens_d(a, b) == pytest.approx(1.0)
    noise = np.array([1e-9, -1e-9, 0.0])
    assert cohens_d(noise, -noise, floor=1e-6) == 0.0
    assert cohens_d(noise + 1.0, noise, floor=1e-6) == np.inf
