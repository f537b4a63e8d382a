"""Tests for safegeom.stats: streaming float64 means/covariances equal a single full pass."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from safegeom.stats import Moments, RunningStats, diff_in_means

ATOL = 1e-10


def full_cov(x: torch.Tensor, ddof: int = 1) -> torch.Tensor:
    """Reference covariance over the last dim, per leading index, of x: [n, *lead, d]."""
    x = x.to(torch.float64)
    c = x - x.mean(dim=0)
    return torch.einsum("b...i,b...j->...ij", c, c) / (x.shape[0] - ddof)


def stream(x: torch.Tensor, cuts: list[int], **kw: object) -> RunningStats:
    rs = RunningStats(tuple(x.shape[1:]), **kw)  # type: ignore[arg-type]
    bounds = [0, *sorted(cuts), x.shape[0]]
    for lo, hi in itertools.pairwise(bounds):
        rs.update(x[lo:hi])
    return rs


def make_data(n: int, shape: tuple[int, ...], seed: int, offset: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # A large common offset makes naive sum-of-squares formulas lose precision; Chan's merge must not.
    return torch.randn((n, *shape), generator=g, dtype=torch.float64) * 2.0 + offset


@pytest.mark.parametrize(
    "cuts",
    [[], [1], list(range(1, 40)), [5, 6, 7, 30], [20]],
    ids=["one-batch", "first-alone", "batch-size-1", "mixed", "halves"],
)
@pytest.mark.parametrize("shape", [(6,), (3, 2, 5)])
def test_streaming_equals_full_pass(cuts: list[int], shape: tuple[int, ...]) -> None:
    x = make_data(40, shape, seed=0)
    rs = stream(x, cuts)
    assert rs.n == 40
    assert rs.mean.dtype == torch.float64
    torch.testing.assert_close(rs.mean, x.mean(dim=0), atol=ATOL, rtol=0)
    cov = rs.covariance()
    assert cov.shape == (*shape[:-1], shape[-1], shape[-1])
    torch.testing.assert_close(cov, full_cov(x), atol=ATOL, rtol=0)
    torch.testing.assert_close(rs.covariance(ddof=0), full_cov(x, ddof=0), atol=ATOL, rtol=0)


def test_matches_torch_cov_for_flat_vectors() -> None:
    x = make_data(50, (4,), seed=1)
    rs = stream(x, [3, 17, 18])
    torch.testing.assert_close(rs.covariance(), torch.cov(x.T), atol=ATOL, rtol=0)


def test_low_precision_inputs_accumulate_in_float64() -> None:
    x = make_data(64, (2, 8), seed=2).to(torch.bfloat16)
    rs = stream(x, [10, 33])
    torch.testing.assert_close(rs.mean, x.double().mean(dim=0), atol=ATOL, rtol=0)
    torch.testing.assert_close(rs.covariance(), full_cov(x.double()), atol=ATOL, rtol=0)


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=30),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=8),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_any_split_points(n: int, cuts: list[int], seed: int) -> None:
    x = make_data(n, (2, 3), seed=seed)
    rs = stream(x, [min(c, n) for c in cuts])  # empty batches from repeated cuts are no-ops
    assert rs.n == n
    torch.testing.assert_close(rs.mean, x.mean(dim=0), atol=ATOL, rtol=0)
    torch.testing.assert_close(rs.covariance(), full_cov(x), atol=ATOL, rtol=0)


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=30),
    split=st.integers(min_value=0, max_value=30),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_merge_equals_single_pass(n: int, split: int, seed: int) -> None:
    x = make_data(n, (5,), seed=seed)
    split = min(split, n)
    a, b = stream(x[:split], []), stream(x[split:], [1] if n - split > 1 else [])
    merged = a.merge(b)
    single = stream(x, [])
    assert merged.n == n
    torch.testing.assert_close(merged.mean, single.mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(merged.covariance(), single.covariance(), atol=ATOL, rtol=0)
    # merge makes a new accumulator and leaves its inputs alone
    assert a.n == split and b.n == n - split


def test_merge_without_covariance_and_three_shards() -> None:
    x = make_data(30, (4,), seed=3)
    shards = [stream(x[i : i + 10], [3], covariance=False) for i in range(0, 30, 10)]
    merged = shards[0].merge(shards[1]).merge(shards[2])
    torch.testing.assert_close(merged.mean, x.mean(dim=0), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="covariance was not tracked"):
        merged.covariance()
    # one side without covariance -> merged result has none
    with_cov = stream(x, [])
    assert with_cov.merge(shards[0]).track_covariance is False


def test_finalize_and_diff_in_means() -> None:
    harmful = make_data(20, (3, 4), seed=4, offset=1.0)
    harmless = make_data(25, (3, 4), seed=5, offset=-1.0)
    a, b = stream(harmful, [7]), stream(harmless, [])
    m = a.finalize()
    assert isinstance(m, Moments)
    assert m.n == 20 and m.shape == (3, 4) and m.cov is not None and m.cov.shape == (3, 4, 4)
    want = harmful.mean(dim=0) - harmless.mean(dim=0)
    for left, right in [(a, b), (m, b), (a, b.finalize()), (m, b.finalize())]:
        got = diff_in_means(left, right)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    means_only = stream(harmful, [], covariance=False).finalize()
    assert means_only.cov is None


def test_moments_frozen() -> None:
    m = stream(make_data(5, (3,), seed=6), []).finalize()
    with pytest.raises(AttributeError):
        m.n = 3  # type: ignore[misc]


@pytest.mark.parametrize("covariance", [True, False])
def test_save_load_round_trip(tmp_path: Path, covariance: bool) -> None:
    m = stream(make_data(12, (2, 5), seed=7), [4], covariance=covariance).finalize(ddof=0)
    path = m.save(tmp_path / "sub" / "moments.safetensors")
    assert path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["safegeom"])
    assert meta["n"] == 12 and meta["shape"] == [2, 5] and meta["ddof"] == 0
    back = Moments.load(path)
    assert back.n == m.n and back.ddof == 0 and back.shape == m.shape
    torch.testing.assert_close(back.mean, m.mean, atol=0, rtol=0)
    if covariance:
        assert back.cov is not None and m.cov is not None
        torch.testing.assert_close(back.cov, m.cov, atol=0, rtol=0)
    else:
        assert back.cov is None


def test_load_rejects_foreign_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"mean": torch.zeros(3)}, str(other))
    with pytest.raises(ValueError, match="not a saved moments file"):
        Moments.load(other)
    with pytest.raises(ValueError, match="no moments file"):
        Moments.load(tmp_path / "missing.safetensors")


def test_bad_shapes() -> None:
    rs = RunningStats((3, 4))
    with pytest.raises(
        ValueError, match=r"shape mismatch: expected activations of shape \[batch, 3, 4\]"
    ):
        rs.update(torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="shape mismatch"):
        rs.update(torch.zeros(3, 4))  # missing batch dim
    with pytest.raises(ValueError, match="shape mismatch in merge"):
        rs.merge(RunningStats((3, 5)))
    with pytest.raises(ValueError, match="positive sizes"):
        RunningStats((3, 0))
    with pytest.raises(ValueError, match="at least one dimension"):
        RunningStats(())
    a = stream(make_data(3, (4,), seed=8), [])
    b = stream(make_data(3, (5,), seed=9), [])
    with pytest.raises(ValueError, match="shape mismatch in diff_in_means"):
        diff_in_means(a, b)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_rejected(bad: float) -> None:
    rs = RunningStats((4,))
    x = torch.zeros(3, 4)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or inf in activations"):
        rs.update(x)
    assert rs.n == 0  # a rejected batch leaves the accumulator untouched


def test_other_bad_input() -> None:
    rs = RunningStats((4,))
    with pytest.raises(ValueError, match="floating-point"):
        rs.update(torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="no samples"):
        rs.finalize()
    rs.update(torch.zeros(0, 4))  # empty batch: no-op
    assert rs.n == 0
    rs.update(torch.ones(1, 4))
    with pytest.raises(ValueError, match="need more than ddof=1 samples"):
        rs.covariance()
    with pytest.raises(ValueError, match="needs samples on both sides"):
        diff_in_means(rs, RunningStats((4,)))
    with pytest.raises(ValueError, match="Moments or RunningStats"):
        diff_in_means(rs, np.zeros(4))  # type: ignore[arg-type]


def test_numpy_input_and_device_kwarg() -> None:
    x = make_data(10, (3,), seed=10)
    rs = RunningStats((3,), device="cpu")
    rs.update(x.numpy())  # type: ignore[arg-type]
    torch.testing.assert_close(rs.mean, x.mean(dim=0), atol=ATOL, rtol=0)
