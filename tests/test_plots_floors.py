"""safegeom.plots and the audit's floors: floor rows are shaded bands (never lines), the causal
figure shows the un-intervened score and rings saturated cells, ticks sit at the checkpoints."""

from __future__ import annotations

import numpy as np
from matplotlib.collections import PolyCollection

from safegeom.plots import plot_causal, plot_coupling, plot_drift, plot_subspace
from safegeom.plots.causal import SATURATED
from tests.test_plots import CARRIER_LAYER, FLOORS, STEPS, synthetic_audit, two_runs


def _bands(ax) -> dict[str, PolyCollection]:
    return {
        c.get_label(): c
        for c in ax.collections
        if isinstance(c, PolyCollection) and not c.get_label().startswith("_")
    }


def _floor_values() -> set[float]:
    return {v for _, _, mean in FLOORS for v in (mean, mean / 2, 1.5 * mean)}


def _no_line_carries_floor_data(ax) -> bool:
    floors = _floor_values()
    return all(
        not np.isclose(np.asarray(line.get_ydata(), float)[:, None], list(floors)).all(axis=1).all()
        for line in ax.get_lines()
    )


def test_subspace_floor_is_a_labelled_band_not_a_line() -> None:
    fig = plot_subspace(synthetic_audit())
    for ax, mean in zip(fig.axes, (0.2, 0.3), strict=True):
        bands = _bands(ax)
        assert list(bands) == ["split-half floor"]
        ys = bands["split-half floor"].get_paths()[0].vertices[:, 1]
        assert np.isclose(ys.min(), mean / 2) and np.isclose(ys.max(), 1.5 * mean)
        assert len(ax.get_lines()) == 1  # the re-extracted cone; the floor is no line
        assert _no_line_carries_floor_data(ax)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "split-half floor" in legend
    assert not any("floor" in line.get_label() for ax in fig.axes for line in ax.get_lines())


def test_coupling_floors_name_what_they_are_per_carrier_and_run() -> None:
    left = plot_coupling(synthetic_audit()).axes[0]
    assert sorted(_bands(left)) == [
        "random-direction floor, h vs cone B",
        "split-half floor, directions h, r",
    ]
    assert _no_line_carries_floor_data(left)
    assert all("floor" not in line.get_label() for line in left.get_lines())
    overlay = plot_coupling(two_runs()).axes[0]
    labels = sorted(_bands(overlay))
    assert len(labels) == len(set(labels)) == 4
    assert "split-half floor, LoRA, directions h, r" in labels


def test_drift_heatmap_never_shows_floor_rows() -> None:
    fig = plot_drift(synthetic_audit())
    image = fig.axes[0].images[0].get_array()
    assert np.allclose(image[:, 0], 1.0)  # the base against itself, not the floor's 0.9


def test_causal_plots_the_unintervened_score_and_rings_saturated_cells() -> None:
    fig = plot_causal(synthetic_audit())
    assert len(fig.axes) == 6
    base_ablation, base_addition = fig.axes[4], fig.axes[5]
    (line,) = [ln for ln in base_ablation.get_lines() if not ln.get_label().startswith("_")]
    assert line.get_label() == "un-intervened score"
    assert list(line.get_xdata()) == list(STEPS)
    assert np.allclose(line.get_ydata(), [-1.0, -1.0 + 0.5 * 40 / 160, -5.7, -5.7])
    rings = [c for c in base_ablation.collections if c.get_label() == SATURATED]
    assert len(rings) == 1
    assert sorted(rings[0].get_offsets()[:, 0]) == [80, 160]
    assert not [c for c in base_addition.collections if c.get_label() == SATURATED]
    net = fig.axes[2]  # the net ablation effect: its saturated cells ringed too
    assert [c for c in net.collections if c.get_label() == SATURATED]
    assert SATURATED in [t.get_text() for t in fig.legends[0].get_texts()]


def test_ticks_are_the_checkpoint_steps() -> None:
    for fig in (
        plot_subspace(two_runs()),
        plot_coupling(synthetic_audit()),
        plot_causal(two_runs()),
    ):
        ax = fig.axes[0]
        assert list(ax.get_xticks()) == list(STEPS)
        assert [t.get_text() for t in ax.get_xticklabels()] == [str(s) for s in STEPS]


def test_one_run_has_no_run_label_prefix() -> None:
    fig = plot_causal({"LoRA": synthetic_audit()})
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels and not any(label.startswith("LoRA") for label in labels)
    assert len(labels) == len(set(labels))
    left = plot_coupling({"LoRA": synthetic_audit()}).axes[0]
    assert f"at layer {CARRIER_LAYER}" in left.get_xlabel()
    assert not any(line.get_label().startswith("LoRA") for line in left.get_lines())
