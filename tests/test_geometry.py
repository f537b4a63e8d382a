"""Property tests for safegeom.geometry (angles in radians)."""

import math

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safegeom.geometry import (
    coordinate_imbalance,
    coordinate_statistics,
    cosine,
    coupling,
    direction_drift,
    effective_rank,
    grassmann_distance,
    orthonormal_basis,
    principal_angles,
    sign_fix,
    subspace_drift,
    unit,
)

FAST = settings(max_examples=50, deadline=None)
seeds = st.integers(min_value=0, max_value=2**32 - 1)


@st.composite
def pair_of_bases(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    """Two random d×k1, d×k2 column bases (generic, so of full rank)."""
    d = draw(st.integers(min_value=2, max_value=12))
    k1 = draw(st.integers(min_value=1, max_value=d))
    k2 = draw(st.integers(min_value=1, max_value=d))
    rng = np.random.default_rng(draw(seeds))
    return rng.standard_normal((d, k1)), rng.standard_normal((d, k2)), rng


def random_orthogonal(k: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((k, k)))
    return q * np.sign(np.diag(r))


def well_conditioned(k: int, rng: np.random.Generator) -> np.ndarray:
    """A non-orthogonal invertible k×k mix with condition number at most 4."""
    u, v = random_orthogonal(k, rng), random_orthogonal(k, rng)
    return u @ np.diag(rng.uniform(0.5, 2.0, size=k)) @ v


# ----------------------------------------------------------------------------- principal angles


@FAST
@given(pair_of_bases())
def test_angles_in_range_ascending_and_count(ab: tuple) -> None:
    A, B, _ = ab
    theta = principal_angles(A, B)
    assert theta.shape == (min(A.shape[1], B.shape[1]),)
    assert np.all(theta >= 0) and np.all(theta <= np.pi / 2)
    assert np.all(np.diff(theta) >= 0)


@FAST
@given(pair_of_bases())
def test_angles_symmetric(ab: tuple) -> None:
    A, B, _ = ab
    np.testing.assert_allclose(principal_angles(A, B), principal_angles(B, A), atol=1e-10)


@FAST
@given(pair_of_bases())
def test_angles_invariant_to_change_of_basis(ab: tuple) -> None:
    A, B, rng = ab
    ref = principal_angles(A, B)
    k2 = B.shape[1]
    np.testing.assert_allclose(principal_angles(A, B @ random_orthogonal(k2, rng)), ref, atol=1e-8)
    np.testing.assert_allclose(principal_angles(A, B @ well_conditioned(k2, rng)), ref, atol=1e-8)
    # orientation: k × d rows give the same answer as d × k columns (when k < d)
    if A.shape[1] < A.shape[0] and B.shape[1] < B.shape[0]:
        np.testing.assert_allclose(principal_angles(A.T, B.T), ref, atol=1e-10)


@FAST
@given(pair_of_bases())
def test_grassmann_matches_scipy(ab: tuple) -> None:
    A, B, _ = ab
    want = np.sort(scipy.linalg.subspace_angles(A, B))
    # scipy sometimes takes arccos of a cosine near 1 (its arcsin mask is not reversed along with
    # the angles), which is only accurate to ~sqrt(eps) = 1.5e-8; hence the tolerance.
    np.testing.assert_allclose(principal_angles(A, B), want, atol=1e-7)
    assert grassmann_distance(A, B) == pytest.approx(float(np.linalg.norm(want)), abs=1e-7)


@FAST
@given(pair_of_bases())
def test_identical_subspaces_have_zero_angles(ab: tuple) -> None:
    A, _, rng = ab
    mixed = A @ well_conditioned(A.shape[1], rng)
    theta = principal_angles(A, mixed)
    np.testing.assert_allclose(theta, 0.0, atol=1e-7)
    assert grassmann_distance(A, A) == pytest.approx(0.0, abs=1e-7)
    np.testing.assert_allclose(subspace_drift(A, A), 0.0, atol=1e-7)


@FAST
@given(st.integers(min_value=2, max_value=12), seeds, st.data())
def test_orthogonal_subspaces_have_right_angles(d: int, seed: int, data: st.DataObject) -> None:
    rng = np.random.default_rng(seed)
    Q = random_orthogonal(d, rng)
    k1 = data.draw(st.integers(min_value=1, max_value=d - 1))
    k2 = data.draw(st.integers(min_value=1, max_value=d - k1))
    theta = principal_angles(Q[:, :k1], Q[:, k1 : k1 + k2])
    np.testing.assert_allclose(theta, np.pi / 2, atol=1e-8)
    assert grassmann_distance(Q[:, :k1], Q[:, k1 : k1 + k2]) == pytest.approx(
        math.sqrt(min(k1, k2)) * np.pi / 2, abs=1e-7
    )


def test_known_angle_between_planes() -> None:
    e = np.eye(3)
    tilted = np.stack([e[0], np.cos(0.3) * e[1] + np.sin(0.3) * e[2]], axis=1)
    np.testing.assert_allclose(principal_angles(e[:, :2], tilted), [0.0, 0.3], atol=1e-12)
    # a direction against a plane: one angle, and torch inputs work the same way
    v = torch.tensor([1.0, 1.0, 0.0])
    np.testing.assert_allclose(principal_angles(v, e[:, [0, 2]]), [np.pi / 4], atol=1e-12)


def test_rank_deficient_input_uses_the_span() -> None:
    rng = np.random.default_rng(0)
    A = rng.standard_normal((8, 2))
    redundant = np.concatenate([A, A @ rng.standard_normal((2, 3))], axis=1)  # rank 2, 5 columns
    B = orthonormal_basis(redundant)
    assert B.shape == (8, 2)
    np.testing.assert_allclose(B.T @ B, np.eye(2), atol=1e-12)
    np.testing.assert_allclose(principal_angles(A, redundant), 0.0, atol=1e-7)


@FAST
@given(pair_of_bases())
def test_orthonormal_basis_qr_keeps_first_vector(ab: tuple) -> None:
    A, _, _ = ab
    Q = orthonormal_basis(A)
    assert Q.shape == A.shape
    np.testing.assert_allclose(Q.T @ Q, np.eye(A.shape[1]), atol=1e-10)
    np.testing.assert_allclose(Q[:, 0], A[:, 0] / np.linalg.norm(A[:, 0]), atol=1e-10)


# ----------------------------------------------------------------------------- directions and drift


@FAST
@given(st.integers(min_value=2, max_value=64), seeds, st.floats(min_value=0.01, max_value=100))
def test_drift_zero_against_self_and_negation(d: int, seed: int, scale: float) -> None:
    r = np.random.default_rng(seed).standard_normal(d)
    assert direction_drift(r, r) == pytest.approx(0.0, abs=1e-12)
    assert direction_drift(r, -scale * r) == pytest.approx(0.0, abs=1e-12)
    assert direction_drift(torch.tensor(r), torch.tensor(-r), reference=r) == pytest.approx(
        0.0, abs=1e-12
    )


@FAST
@given(st.integers(min_value=2, max_value=64), seeds)
def test_drift_range_and_sign_fix(d: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    r0, rt, ref = rng.standard_normal(d), rng.standard_normal(d), rng.standard_normal(d)
    drift = direction_drift(r0, rt)
    assert 0.0 <= drift <= 1.0
    assert drift == pytest.approx(1 - abs(cosine(r0, rt)), abs=1e-12)
    fixed = sign_fix(r0, ref)
    assert float(fixed @ ref) >= 0
    np.testing.assert_allclose(np.abs(fixed), np.abs(r0))
    with_ref = direction_drift(r0, rt, reference=ref)
    assert 0.0 <= with_ref <= 2.0
    assert with_ref >= drift - 1e-12


def test_drift_with_reference_detects_a_flip() -> None:
    e = np.eye(3)
    # step-t direction is the negation relative to its own harmful-harmless difference
    assert direction_drift(e[0], -e[0]) == pytest.approx(0.0)
    assert direction_drift(e[0], -e[0], reference=(e[0], e[0])) == pytest.approx(0.0)
    assert direction_drift(e[0], e[0], reference=(e[0], -e[0])) == pytest.approx(2.0)
    assert direction_drift(e[0], e[1]) == pytest.approx(1.0)


def test_unit_and_cosine() -> None:
    np.testing.assert_allclose(unit(torch.tensor([3.0, 4.0])), [0.6, 0.8])
    assert cosine([1, 0], [1, 1]) == pytest.approx(1 / math.sqrt(2))
    assert cosine([1, 0], [-2, 0]) == -1.0
    assert isinstance(cosine(np.ones(3), np.ones(3)), float)


# ----------------------------------------------------------------------------- effective rank


@FAST
@given(st.integers(min_value=1, max_value=20), st.integers(min_value=1, max_value=20), seeds)
def test_effective_rank_one_for_rank_one(m: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    M = np.outer(rng.standard_normal(m), rng.standard_normal(n))
    assert effective_rank(M) == pytest.approx(1.0, abs=1e-6)


@FAST
@given(st.integers(min_value=1, max_value=16), st.floats(min_value=1e-3, max_value=1e3), seeds)
def test_effective_rank_k_for_k_equal_singular_values(k: int, s: float, seed: int) -> None:
    assert effective_rank(np.full(k, s)) == pytest.approx(k, rel=1e-12)
    rng = np.random.default_rng(seed)
    d = k + 3
    U = random_orthogonal(d, rng)[:, :k]
    V = random_orthogonal(k, rng)
    assert effective_rank(s * U @ V) == pytest.approx(k, rel=1e-9)


@FAST
@given(st.lists(st.floats(min_value=0, max_value=1e3), min_size=1, max_size=10))
def test_effective_rank_bounds(sv: list[float]) -> None:
    sv_arr = np.array(sv)
    if sv_arr.sum() == 0:
        with pytest.raises(ValueError, match="zero matrix"):
            effective_rank(sv_arr)
        return
    er = effective_rank(sv_arr)
    assert 1.0 - 1e-9 <= er <= np.count_nonzero(sv_arr) + 1e-9


# ----------------------------------------------------------------------------- coupling


@FAST
@given(pair_of_bases())
def test_coupling_in_unit_interval(ab: tuple) -> None:
    A, B, _ = ab
    for reduce in ("mean_cos2", "max_cos2"):
        c = coupling(A, B, reduce=reduce)  # type: ignore[arg-type]
        assert 0.0 <= c <= 1.0
    assert coupling(A, B, reduce="max_cos2") >= coupling(A, B, reduce="mean_cos2") - 1e-12
    c1 = coupling(A[:, 0], B[:, 0])
    assert 0.0 <= c1 <= 1.0
    assert c1 == pytest.approx(abs(cosine(A[:, 0], B[:, 0])))


@FAST
@given(pair_of_bases(), st.sampled_from(["mean_cos2", "max_cos2"]))
def test_coupling_direction_equals_one_vector_basis(ab: tuple, reduce: str) -> None:
    """A direction ``[d]`` and the one-column basis ``[d, 1]`` (or row ``[1, d]``) holding it are
    the same carrier: the coupling is the same number, |cos|, for either form and any reduce."""
    A, B, _ = ab
    h, r = A[:, 0], B[:, 0]
    expected = abs(cosine(h, r))
    for hh in (h, h[:, None], h[None, :]):
        for rr in (r, r[:, None], r[None, :]):
            value = coupling(hh, rr, reduce=reduce)  # type: ignore[arg-type]
            assert value == pytest.approx(expected, abs=1e-12)


def test_coupling_values() -> None:
    e = np.eye(4)
    assert coupling(e[0], e[1]) == 0.0
    assert coupling(e[0], -3 * e[0]) == 1.0
    assert coupling(e[:, :2], e[:, 2:]) == pytest.approx(0.0, abs=1e-12)
    assert coupling(e[:, :2], e[:, :2]) == pytest.approx(1.0)
    # span{e0, e1} vs span{e0, e2}: angles 0 and π/2
    assert coupling(e[:, :2], e[:, [0, 2]]) == pytest.approx(0.5)
    assert coupling(e[:, :2], e[:, [0, 2]], reduce="max_cos2") == pytest.approx(1.0)
    # direction vs subspace: the subspace path with one angle (cos² of π/4)
    assert coupling(np.array([1.0, 0, 1.0, 0]), e[:, :2]) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- coordinate statistics


def test_coordinate_statistics_cohens_d_on_crafted_data() -> None:
    d = 5
    basis = np.eye(d)[:, :2] * 7.0  # scaled: coordinates use unit-normalised basis vectors
    harmful = np.zeros((4, d))
    harmful[:, 0] = [1.0, 2.0, 3.0, 4.0]  # mean 2.5, var 5/3
    harmful[:, 1] = [0.0, 0.0, 2.0, 2.0]  # mean 1,   var 4/3
    harmless = np.zeros((3, d))
    harmless[:, 0] = [0.0, 1.0, 2.0]  # mean 1,   var 1
    harmless[:, 1] = [1.0, 1.0, 1.0]  # mean 1,   var 0
    df = coordinate_statistics(basis, torch.tensor(harmful), harmless)
    assert isinstance(df, pd.DataFrame)
    assert list(df["coordinate"]) == [0, 1]
    np.testing.assert_allclose(df["mean_harmful"], [2.5, 1.0])
    np.testing.assert_allclose(df["var_harmful"], [5 / 3, 4 / 3])
    np.testing.assert_allclose(df["mean_harmless"], [1.0, 1.0])
    np.testing.assert_allclose(df["var_harmless"], [1.0, 0.0])
    pooled0 = math.sqrt((3 * 5 / 3 + 2 * 1) / 5)
    np.testing.assert_allclose(df["separation"], [1.5 / pooled0, 0.0])
    assert coordinate_imbalance(df) == pytest.approx(np.std([1.5 / pooled0, 0.0]))
    assert coordinate_imbalance(df, measure="range") == pytest.approx(1.5 / pooled0)
    # k × d orientation and a single direction
    df_rows = coordinate_statistics(basis.T, harmful, harmless)
    pd.testing.assert_frame_equal(df, df_rows)
    single = coordinate_statistics(np.eye(d)[0], harmful, harmless)
    assert len(single) == 1 and coordinate_imbalance(single) == 0.0


@FAST
@given(seeds, st.floats(min_value=-3, max_value=3))
def test_cohens_d_recovers_shift(seed: int, shift: float) -> None:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((200, 6))
    harmful = base[:100].copy()
    harmless = base[100:].copy()
    harmful[:, 0] += shift
    df = coordinate_statistics(np.eye(6)[:, :1], harmful, harmless)
    pooled = math.sqrt((99 * harmful[:, 0].var(ddof=1) + 99 * harmless[:, 0].var(ddof=1)) / 198)
    want = (harmful[:, 0].mean() - harmless[:, 0].mean()) / pooled
    assert float(df["separation"].iloc[0]) == pytest.approx(want, rel=1e-10, abs=1e-12)
    # imbalance ignores the arbitrary sign of a basis vector
    flipped = coordinate_statistics(-np.eye(6)[:, :1], harmful, harmless)
    assert coordinate_imbalance(flipped) == coordinate_imbalance(df)


# ----------------------------------------------------------------------------- bad inputs


def test_bad_input_messages() -> None:
    v = np.ones(4)
    with pytest.raises(ValueError, match="hidden size mismatch"):
        cosine(v, np.ones(5))
    with pytest.raises(ValueError, match="a is a zero vector"):
        cosine(np.zeros(4), v)
    with pytest.raises(ValueError, match="contains NaN or inf"):
        cosine(np.array([1.0, np.nan, 0, 0]), v)
    with pytest.raises(ValueError, match="B contains NaN or inf"):
        principal_angles(np.eye(4)[:, :2], np.array([[1.0], [np.inf], [0], [0]]))
    with pytest.raises(ValueError, match="hidden size mismatch"):
        principal_angles(np.ones((6, 2)), np.ones((5, 2)))
    with pytest.raises(ValueError, match="hidden size mismatch"):
        principal_angles(np.ones(6), np.ones((5, 2)))
    with pytest.raises(ValueError, match="A is zero"):
        principal_angles(np.zeros((6, 2)), np.ones((6, 2)))
    with pytest.raises(ValueError, match=r"must be 1-D .* or 2-D"):
        principal_angles(np.ones((2, 3, 4)), np.ones((4, 1)))
    with pytest.raises(ValueError, match="is empty"):
        orthonormal_basis(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="reference is a zero vector"):
        sign_fix(v, np.zeros(4))
    with pytest.raises(ValueError, match="rt is a zero vector"):
        direction_drift(v, np.zeros(4))
    with pytest.raises(ValueError, match="hidden size mismatch"):
        direction_drift(v, v, reference=np.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        effective_rank(np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="zero matrix"):
        effective_rank(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="unknown reduce"):
        coupling(np.eye(4)[:, :2], np.eye(4)[:, 2:], reduce="min")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown measure"):
        coordinate_imbalance(pd.DataFrame({"separation": [1.0]}), measure="iqr")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hidden size mismatch"):
        coordinate_statistics(np.eye(5)[:, :2], np.ones((3, 4)), np.ones((3, 4)))
    with pytest.raises(ValueError, match="harmful needs at least 2 prompts"):
        coordinate_statistics(np.eye(4)[0], np.ones((1, 4)), np.ones((3, 4)))
    with pytest.raises(ValueError, match="harmless must be"):
        coordinate_statistics(np.eye(4)[0], np.ones((3, 4)), np.ones(4))
    with pytest.raises(ValueError, match=r"basis vector\(s\) \[1\] are zero"):
        coordinate_statistics(
            np.array([[1.0, 0], [0, 0], [0, 0], [0, 0]]), np.ones((3, 4)), np.ones((3, 4))
        )
    with pytest.raises(ValueError, match="zero pooled variance"):
        coordinate_imbalance(coordinate_statistics(np.eye(4)[0], np.ones((3, 4)), np.zeros((3, 4))))
