"""The batched refits and statistics behind the geometry rows' CIs and floors, against the pure fit
functions and geometry functions they batch; intervals that cover their estimate and shrink with
more prompts; bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safegeom.audit import batched_geometry as bg
from safegeom.audit.config import AuditConfig
from safegeom.audit.resample import (
    Draws,
    bootstrap_draws,
    cone_bases,
    directions,
    percentile_interval,
    split_halves,
)
from safegeom.carriers.fit import cone_basis, diff_in_means
from safegeom.errors import ConfigError, SafegeomError
from safegeom.geometry import coordinate_statistics, coupling, principal_angles

POSITIONS = ("t_post[-3]", "t_post[-2]", "t_post[-1]")


def _acts(n: int, m: int, d: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Harmful and harmless activations ``[n, 3, d]``: Gaussian, classes apart along a few axes."""
    gen = torch.Generator().manual_seed(seed)
    shift = torch.zeros(len(POSITIONS), d, dtype=torch.float64)
    for p in range(len(POSITIONS)):
        shift[p, p] = 3.0
        shift[p, 3] = 1.0
    harmful = torch.randn(n, len(POSITIONS), d, generator=gen, dtype=torch.float64) + shift
    harmless = torch.randn(m, len(POSITIONS), d, generator=gen, dtype=torch.float64)
    return harmful, harmless


def _rows(draws: Draws, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample ``i``'s prompt indices, each repeated as drawn."""
    h = torch.repeat_interleave(torch.arange(draws.harmful.shape[1]), draws.harmful[i].long())
    s = torch.repeat_interleave(torch.arange(draws.harmless.shape[1]), draws.harmless[i].long())
    return h, s


def test_draws_count_every_class_and_halves_are_disjoint() -> None:
    gen = torch.Generator().manual_seed(0)
    draws = bootstrap_draws(10, 7, 50, gen)
    assert draws.size == 50
    np.testing.assert_array_equal(draws.harmful.sum(1), 10.0)
    np.testing.assert_array_equal(draws.harmless.sum(1), 7.0)
    first, second = split_halves(10, 7, 30, gen)
    for a, b, half in ((first.harmful, second.harmful, 5), (first.harmless, second.harmless, 3)):
        assert bool(((a * b) == 0).all())  # disjoint in every split
        np.testing.assert_array_equal(a.sum(1), half)
        np.testing.assert_array_equal(b.sum(1), half)
        assert set(a.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("k", [2, 4])  # 4 > 3 positions: singular directions enter the basis
@pytest.mark.parametrize("n", [20, 40])  # fewer and more prompts than d = 24 (two Gram forms)
def test_batched_fits_equal_the_pure_fits_on_every_resample(k: int, n: int) -> None:
    harmful, harmless = _acts(n, 16)
    draws = bootstrap_draws(n, 16, 6, torch.Generator().manual_seed(1))
    dirs = directions(draws, harmful[:, -1], harmless[:, -1])
    bases, ranks = cone_bases(draws, harmful, harmless, k, positions=POSITIONS)
    for i in range(draws.size):
        h, s = _rows(draws, i)
        pure = diff_in_means(harmful[h, -1], harmless[s, -1]).vectors
        torch.testing.assert_close(dirs[i], pure, rtol=1e-12, atol=1e-12)
        fit = cone_basis(harmful[h], harmless[s], k, positions=POSITIONS)
        # same subspace (projectors agree) and the same effective rank of the sources
        torch.testing.assert_close(
            bases[i].T @ bases[i], fit.vectors.T @ fit.vectors, rtol=0, atol=1e-10
        )
        assert float(ranks[i]) == pytest.approx(fit.scores["effective_rank"], rel=1e-10)
        if k <= len(POSITIONS):  # rows from the positions alone: equal row by row, signs too
            torch.testing.assert_close(bases[i], fit.vectors, rtol=0, atol=1e-10)


def test_batched_statistics_equal_the_geometry_functions() -> None:
    harmful, harmless = _acts(20, 16)
    draws = bootstrap_draws(20, 16, 5, torch.Generator().manual_seed(2))
    bases, _ = cone_bases(draws, harmful, harmless, 3, positions=POSITIONS)
    dirs = directions(draws, harmful[:, 0], harmless[:, 0])
    base = bases[0]
    theta = bg.principal_angles(base, bases)
    pair = bg.principal_angles(bases, bases.flip(0))
    couple_dir = bg.coupling(dirs, dirs.flip(0))
    couple_cone = bg.coupling(dirs, bases)
    for i in range(draws.size):
        np.testing.assert_allclose(theta[i], principal_angles(base, bases[i]), atol=1e-10)
        np.testing.assert_allclose(pair[i], principal_angles(bases[i], bases[-1 - i]), atol=1e-10)
        assert float(couple_dir[i]) == pytest.approx(coupling(dirs[i], dirs[-1 - i]), abs=1e-12)
        assert float(couple_cone[i]) == pytest.approx(
            coupling(dirs[i], bases[i], hidden_size=24), abs=1e-10
        )
        h, s = _rows(draws, i)
        stats = coordinate_statistics(base, harmful[h, 0], harmless[s, 0])
        proj = (harmful[:, 0] @ base.T, harmless[:, 0] @ base.T)
        d = bg.cohens_d(*proj, draws.harmful[i : i + 1], draws.harmless[i : i + 1])
        np.testing.assert_allclose(d[0], stats["separation"], rtol=1e-10, atol=1e-12)
    assert bg.cosines(dirs[0], dirs)[0] == pytest.approx(1.0)


def test_interval_covers_its_estimate_even_on_a_boundary() -> None:
    samples = torch.linspace(0.1, 0.5, 101, dtype=torch.float64)
    low, high = percentile_interval(samples, 0.3)
    assert low == pytest.approx(0.11) and high == pytest.approx(0.49)
    assert percentile_interval(samples, 0.0) == (0.0, pytest.approx(0.49))  # drift 0 at the base
    nan = torch.full((5,), float("nan"), dtype=torch.float64)
    assert all(np.isnan(percentile_interval(nan, 0.0)))


def _width(n: int) -> dict[str, float]:
    """CI widths of a direction's cosine to a fixed one, a cone's largest angle to a fixed one and
    the h/r coupling, with ``n`` prompts per class drawn from one distribution."""
    harmful, harmless = _acts(n, n, seed=5)
    full = Draws(torch.ones(1, n, dtype=torch.float64), torch.ones(1, n, dtype=torch.float64))
    draws = bootstrap_draws(n, n, 400, torch.Generator().manual_seed(3))
    r = directions(draws, harmful[:, -1], harmless[:, -1])
    r0 = directions(full, harmful[:, -1], harmless[:, -1])[0]
    h = directions(draws, harmful[:, 0], harmless[:, 0])
    b, _ = cone_bases(draws, harmful, harmless, 2, positions=POSITIONS)
    b0, _ = cone_bases(full, harmful, harmless, 2, positions=POSITIONS)
    stats = {
        "cosine": (bg.cosines(r0, r), float(bg.cosines(r0, r0[None])[0])),
        "angle": (bg.principal_angles(b0[0], b).max(1).values, 0.0),
        "coupling": (bg.coupling(h, r), float(bg.coupling(h[:1], r[:1])[0])),
    }
    widths = {}
    for name, (samples, estimate) in stats.items():
        low, high = percentile_interval(samples, estimate)
        widths[name] = high - low
    return widths


def test_intervals_shrink_with_more_prompts() -> None:
    small, large = _width(24), _width(384)
    for name in small:
        assert large[name] < 0.6 * small[name], (name, small[name], large[name])


def test_bad_inputs_name_the_fix() -> None:
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(SafegeomError, match="raise n_per_class or n_resamples"):
        bootstrap_draws(0, 5, 10, gen)
    with pytest.raises(SafegeomError, match="split halves need at least 2 prompts"):
        split_halves(1, 5, 10, gen)
    with pytest.raises(SafegeomError, match="draw both classes for every resample"):
        Draws(torch.ones(2, 3), torch.ones(3, 3))
    with pytest.raises(SafegeomError, match="draw at least one per class"):
        Draws(torch.ones(2, 3), torch.zeros(2, 3))
    for bad in (0.0, 0.5, float("nan")):
        with pytest.raises(ConfigError, match=r"saturation_margin .* must lie in \(0, 0.5\)"):
            AuditConfig(saturation_margin=bad)
