"""The carrier fit functions on random tensors (no model): properties that hold for any
activations, and the one-line errors of bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safegeom.carriers.fit import cone_basis, diff_in_means, fit_cone, fit_dim, gram_schmidt
from safegeom.carriers.probes import fit_probe_carrier
from safegeom.carriers.registry import CarrierType, ClassActivations, read_positions
from safegeom.errors import ConfigError, SafegeomError
from safegeom.geometry import principal_angles

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def classes(draw: st.DrawFn, positions: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Harmful ``[n, pos, d]`` and harmless ``[m, pos, d]`` float64 activations, the harmful
    class shifted by a random offset per position."""
    n, m = draw(st.integers(3, 9)), draw(st.integers(3, 9))
    pos = positions or draw(st.integers(1, 4))
    d = draw(st.integers(8, 16))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shift = torch.randn(pos, d, generator=gen, dtype=torch.float64) * 3
    harmful = torch.randn(n, pos, d, generator=gen, dtype=torch.float64) + shift
    harmless = torch.randn(m, pos, d, generator=gen, dtype=torch.float64)
    return harmful, harmless


def _labels(pos: int) -> tuple[str, ...]:
    return tuple(f"t_post[{i}]" for i in range(-pos, 0))


@SETTINGS
@given(classes(positions=1), st.floats(-5, 5))
def test_diff_in_means_is_antisymmetric_and_translation_invariant(acts, offset: float) -> None:
    h, s = acts[0][:, 0], acts[1][:, 0]
    fitted = diff_in_means(h, s)
    assert fitted.vectors.dtype == torch.float64 and fitted.vectors.shape == (h.shape[1],)
    assert torch.equal(diff_in_means(s, h).vectors, -fitted.vectors)
    moved = diff_in_means(h + offset, s + offset).vectors
    torch.testing.assert_close(moved, fitted.vectors, atol=1e-9, rtol=1e-9)
    assert fitted.scores["norm"] == pytest.approx(float(fitted.vectors.norm()))
    # a class mean computed elsewhere passes as one row
    from_means = diff_in_means(h.mean(0, keepdim=True), s.mean(0, keepdim=True)).vectors
    torch.testing.assert_close(from_means, fitted.vectors, atol=1e-12, rtol=1e-12)


@SETTINGS
@given(classes(positions=1), st.integers(0, 40))
def test_fit_dim_is_the_difference_as_a_carrier(acts, layer: int) -> None:
    h, s = acts[0][:, 0], acts[1][:, 0]
    c = fit_dim(h, s, kind="harmfulness", layer=layer, position="t_inst")
    assert (c.kind, c.method, c.layer, c.position, c.k) == (
        "harmfulness",
        "dim",
        layer,
        "t_inst",
        1,
    )
    assert torch.equal(c.direction, diff_in_means(h, s).vectors.float())


@SETTINGS
@given(classes(), st.integers(1, 3), st.floats(0.1, 10))
def test_cone_basis_is_orthonormal_led_by_the_last_difference(acts, k: int, scale: float) -> None:
    h, s = acts
    labels = _labels(h.shape[1])
    fitted = cone_basis(h, s, k, positions=labels)
    b = fitted.vectors
    assert b.shape == (k, h.shape[2]) and b.dtype == torch.float64
    torch.testing.assert_close(b @ b.T, torch.eye(k, dtype=torch.float64), atol=1e-9, rtol=0)
    last = h[:, -1].mean(0) - s[:, -1].mean(0)
    assert float(b[0] @ last) == pytest.approx(float(last.norm()), rel=1e-9)
    assert fitted.scores["alpha"] == pytest.approx(float(last.norm()), rel=1e-12)
    assert 1.0 <= fitted.scores["effective_rank"] <= fitted.scores["n_raw"] + 1e-9
    assert fitted.extra["raw_vectors"][0] == labels[-1]
    # the same subspace after a common shift, and after scaling both classes
    shifted = cone_basis(h + 2.5, s + 2.5, k, positions=labels)
    scaled = cone_basis(h * scale, s * scale, k, positions=labels)
    for moved in (shifted, scaled):
        theta = principal_angles(b, moved.vectors, hidden_size=h.shape[2])
        assert float(np.max(theta)) < 1e-5
    assert scaled.scores["alpha"] == pytest.approx(scale * fitted.scores["alpha"], rel=1e-9)


@SETTINGS
@given(classes(positions=2))
def test_cone_from_categories_starts_with_the_overall_difference(acts) -> None:
    h, s = acts
    cats = ["rare"] + ["common"] * (len(h) - 1)  # the more frequent category comes first
    c = fit_cone(h, s, k=2, layer=3, positions=_labels(2), source="categories", categories=cats)
    assert c.method == "cone-cheap" and c.position == "t_post[-1]" and c.layer == 3
    assert c.provenance["raw_vectors"][:3] == ["all", "common", "rare"]
    last = (h[:, -1].mean(0) - s[:, -1].mean(0)).float()
    torch.testing.assert_close(c.vectors[0], last / last.norm(), atol=1e-5, rtol=1e-5)


@SETTINGS
@given(st.integers(2, 6), st.integers(6, 12), st.integers(0, 1000))
def test_gram_schmidt_keeps_the_span_of_each_prefix(m: int, d: int, seed: int) -> None:
    v = torch.randn(m, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    b = gram_schmidt(torch.cat([v[:1], v[:1] * 2, v[1:]]), m)  # the repeat is skipped
    torch.testing.assert_close(b @ b.T, torch.eye(m, dtype=torch.float64), atol=1e-9, rtol=0)
    for j in range(1, m + 1):  # v[j-1] lies in the span of the first j rows
        residual = v[j - 1] - (v[j - 1] @ b[:j].T) @ b[:j]
        assert float(residual.norm()) < 1e-8 * float(v[j - 1].norm())


@SETTINGS
@given(st.integers(0, 1000), st.floats(1.0, 4.0))
def test_probe_carrier_points_from_harmless_to_harmful(seed: int, gap: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    d, layers = 6, (2, 5)
    shift = torch.zeros(len(layers), d)
    shift[1, 0] = gap  # only the second layer separates the classes
    # 40 a class: with 12, a layer without signal sometimes won the held-out AUROC (seed 192)
    h = torch.randn(40, len(layers), d, generator=gen) + shift
    s = torch.randn(40, len(layers), d, generator=gen)
    c = fit_probe_carrier(h, s, layers, position="t_inst", seed=seed)
    assert c.method == "probe" and c.position == "t_inst" and c.layer in layers
    j = layers.index(c.layer)
    mean_gap = (h[:, j].double().mean(0) - s[:, j].double().mean(0)).float()
    assert float(c.direction @ mean_gap) > 0
    assert c.scores["separation"] == pytest.approx(float(c.direction.norm()), rel=1e-5)
    assert 0.0 <= c.scores["accuracy"] <= 1.0


def test_bad_inputs_name_the_fix() -> None:
    h, s = torch.randn(4, 2, 8), torch.randn(5, 2, 8)
    with pytest.raises(SafegeomError, match=r"activations must be \[n, d\] with n ≥ 1"):
        diff_in_means(h, s[:, 0])
    with pytest.raises(SafegeomError, match="read both at the same site and positions"):
        diff_in_means(h[:, 0], torch.randn(5, 9))
    with pytest.raises(ConfigError, match="carrier vectors must be finite and non-zero"):
        fit_dim(h[:, 0], h[:, 0], kind="refusal", layer=1, position="t_inst")
    with pytest.raises(ConfigError, match="unknown cone source 'rows'"):
        cone_basis(h, s, 1, positions=_labels(2), source="rows")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must be a whole number ≥ 1"):
        cone_basis(h, s, 0, positions=_labels(2))
    with pytest.raises(SafegeomError, match="n_svd must be ≥ 0"):
        cone_basis(h, s, 1, positions=_labels(2), n_svd=-1)
    with pytest.raises(SafegeomError, match="label every position"):
        cone_basis(h, s, 1, positions=_labels(3))
    with pytest.raises(SafegeomError, match="pass categories= or use source='positions'"):
        cone_basis(h, s, 1, positions=_labels(2), source="categories")
    with pytest.raises(SafegeomError, match="pass one category per harmful prompt"):
        cone_basis(h, s, 1, positions=_labels(2), source="categories", categories=["a"])
    with pytest.raises(SafegeomError, match="span only 2 dimensions, fewer than k=9"):
        cone_basis(h, s, 9, positions=_labels(2), n_svd=0)
    with pytest.raises(SafegeomError, match="zero up to float noise"):
        cone_basis(h * 1e-9, s * 1e-9, 1, positions=_labels(2), noise=1e-3)
    with pytest.raises(SafegeomError, match=r"must be \[n, layer, d\] for both classes"):
        fit_probe_carrier(h, s[:, :1], (0, 1), position="t_inst")
    with pytest.raises(SafegeomError, match="name every layer"):
        fit_probe_carrier(h, s, (0,), position="t_inst")


def test_class_activations_and_types_check_their_positions() -> None:
    h, s = torch.randn(4, 3, 8), torch.randn(5, 3, 8)
    labels = ("t_inst", "t_post[-2]", "t_post[-1]")
    post = read_positions(h, s, labels, "t_post", k=2)
    assert post.positions == labels[1:] and post.harmful.shape == (4, 2, 8) and post.k == 2
    one = read_positions(h, s, labels, "t_inst")
    assert torch.equal(one.single()[0], h[:, 0]) and torch.equal(one.single()[1], s[:, 0])
    with pytest.raises(SafegeomError, match="a direction reads one position"):
        post.single()
    with pytest.raises(SafegeomError, match=r"was not captured .* capture t_inst,t_post"):
        read_positions(h, s, labels, "t_post[-5]")
    with pytest.raises(ConfigError, match="use t_inst, t_post or one t_post"):
        CarrierType("x", "refusal", "dim", "last", lambda a: diff_in_means(*a.single()))
    with pytest.raises(ConfigError, match="a carrier type needs a name"):
        CarrierType("", "refusal", "dim", "t_inst", lambda a: diff_in_means(*a.single()))
    assert isinstance(one, ClassActivations)


def test_choose_admissible_picks_from_a_scored_table() -> None:
    import pandas as pd

    from safegeom.carriers import Carrier
    from safegeom.carriers.admissible import choose_admissible

    cands = [
        Carrier(vectors=torch.randn(8), kind="refusal", method="dim", layer=j, position="t_inst")
        for j in range(3)
    ]
    table = pd.DataFrame(
        {
            "candidate": range(3),
            "layer": range(3),
            "kl": [0.05, 0.5, 0.01],
            "bypass": [1.0, 0.0, 2.0],
            "induce": [0.0, 1.0, 0.5],
            "bypass_effect": [2.0, 3.0, 1.0],
            "induce_effect": [1.0, 3.0, 0.5],
            "effect": [3.0, 6.0, 1.5],
        }
    )
    table.attrs.update(base_harmful=3.0, base_harmless=-1.0)
    chosen = choose_admissible(cands, table)  # candidate 1 has more effect but too much KL
    assert chosen.layer == 0 and chosen.method == "admissible"
    assert chosen.scores["n_admissible"] == 2.0 and chosen.scores["base_harmful"] == 3.0
    assert chosen.provenance["source_method"] == "dim"
    assert choose_admissible(cands, table, max_kl=1.0).layer == 1
    with pytest.raises(SafegeomError, match="pass the candidates the table was computed for"):
        choose_admissible(cands[:2], table)
    with pytest.raises(SafegeomError, match="no candidate is admissible"):
        choose_admissible(cands, table, min_effect=10.0)
    with pytest.raises(ConfigError, match="unknown rank_by 'size'"):
        choose_admissible(cands, table, rank_by="size")  # type: ignore[arg-type]
