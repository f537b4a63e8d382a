"""safegeom.plots: every figure from synthetic audit tables, overlays, missing metrics, no I/O."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from safegeom.audit.schema import frame
from safegeom.errors import SafegeomError
from safegeom.plots import (
    FIGURES,
    has_data,
    plot_behaviour,
    plot_causal,
    plot_coordinates,
    plot_coupling,
    plot_drift,
    plot_interference,
    plot_subspace,
)

STEPS = (0, 40, 80, 160)
LAYERS = (0, 1, 2, 3, 4, 5)
CARRIER_LAYER = 3
HARMFUL_TEST = ("advbench:test", "jbb-harmful:test")
HARMLESS_TEST = (("alpaca:test", "substring"), ("xstest-safe:test", "xstest"))


FLOORS = (
    ("cosine_to_base", "refusal", 0.9),
    ("direction_drift", "refusal", 0.05),
    ("principal_angle_max", "cone", 0.2),
    ("grassmann_distance", "cone", 0.3),
    ("hr_coupling", "hr", 0.05),
    ("hr_coupling", "hr-cone", 0.02),
)
"""(metric, carrier, mean) of the synthetic floor rows (hr-cone's from random directions)."""


def _ci(value: float, half: float) -> dict:
    return {"value": value, "ci_low": value - half, "ci_high": value + half}


def synthetic_audit(*, speed: float = 1.0, behaviour: bool = True, seed: int = 0) -> pd.DataFrame:
    """A realistic audit table of 4 checkpoints, 6 layers, every metric family. ``speed`` scales
    how fast the run drifts (a defended run: small). ``behaviour=False``: a --no-generate audit.
    """
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    for step in STEPS:
        t = speed * step / STEPS[-1]  # 0 at the base, `speed` at the last checkpoint
        ckpt = "base" if step == 0 else f"step-{step:06d}"

        def add(metric: str, value: float, *, half: float | None = None, **keys: object) -> None:
            row = {"checkpoint": ckpt, "step": step, "metric": metric, **keys}  # noqa: B023
            row.update(_ci(value, half) if half is not None else {"value": value})
            rows.append(row)

        if behaviour:
            for prompts in HARMFUL_TEST:
                asr = min(1.0, 0.05 + 0.8 * t + rng.uniform(0, 0.05))
                add("asr", asr, half=0.08, prompts=prompts, n=32, judge="substring")
                add("refusal_rate", 1 - asr, half=0.08, prompts=prompts, n=32, judge="substring")
            for prompts, judge in HARMLESS_TEST:
                add("over_refusal", 0.1 + 0.05 * t, half=0.06, prompts=prompts, n=32, judge=judge)
            add("task_accuracy", 0.2 + 0.6 * min(t, 1), half=0.1, prompts="arith:test", n=32)
            add("cross_entropy", 2.0 - 0.3 * t, prompts="alpaca:test", n=32)
        add("refusal_score", 3.0 - 4 * t, half=0.3, prompts="advbench:val", n=32)
        add("kl_to_base", 0.5 * t**2, prompts="alpaca:val", n=32)
        # geometry, the way safegeom.audit.geometry_rows writes it: every row has a layer
        common = {"prompts": "advbench:train+alpaca:train", "n": 64}
        for carrier, rate in (("refusal", 0.6), ("harmfulness", 0.2)):
            for layer in LAYERS:
                cos = 1.0 if step == 0 else float(np.cos(rate * t * (1 + layer / 3)))
                for metric, value in (("cosine_to_base", cos), ("direction_drift", 1 - abs(cos))):
                    add(metric, value, layer=layer, carrier=carrier, source="reextracted", **common)
        for layer in LAYERS:
            per = {"layer": layer, "source": "reextracted", **common}
            depth = (1 + layer) / len(LAYERS)
            angle = min(np.pi / 2, 0.9 * t * depth)
            add("principal_angle_max", angle, carrier="cone", **per)
            add("grassmann_distance", angle * 1.3, carrier="cone", **per)
            add("effective_rank", 2.5 - 0.5 * t, carrier="cone", **per)
            add("hr_coupling", 0.3 + 0.1 * depth + 0.2 * t, carrier="hr", **per)
            add("hr_coupling", 0.2 + 0.1 * depth + 0.1 * t, carrier="hr-cone", **per)
        for layer in LAYERS:  # noise floors, the way safegeom.audit.floors writes them
            floor = {"layer": layer, "source": "floor", **common}
            split = "split-half: two disjoint halves of 32 + 32 prompts, 50 random splits"
            for metric, carrier, mean in FLOORS:
                note = "random directions: 50 unit vectors" if carrier == "hr-cone" else split
                add(metric, mean, half=mean / 2, carrier=carrier, note=note, **floor)
        at = {"layer": CARRIER_LAYER, **common}
        for source, slow in (("fixed", 1.0), ("reextracted", 0.3)):
            for j in range(3):
                add(
                    "coordinate_separation",
                    2.0 - slow * (0.5 + j * 0.4) * t,
                    half=0.2,
                    carrier=f"cone[{j}]",
                    source=source,
                    **at,
                )
            add("coordinate_imbalance", 0.2 + slow * 0.3 * t, carrier="cone", source=source, **at)
        # interference, the way safegeom.audit.interference writes it (the share: after step 0)
        grads = {"prompts": "arith[:32] vs advbench:train", "n": 64}
        null = "random directions: cosine of 50 uniformly random directions"
        for metric, layer, value, half in (
            ("interference_grad_resid", CARRIER_LAYER, -0.3 - 0.2 * t, 0.12),
            ("interference_grad_weights", None, -0.02 - 0.02 * t, 0.001),
        ):
            add(metric, value, half=0.05, layer=layer, **grads)
            add(metric, 0.0, half=half, layer=layer, source="floor", note=null, **grads)
        if step:
            share = {"layer": CARRIER_LAYER, "carrier": "cone", **common}
            add("interference_cone_share", 0.3 * t, half=0.05, source="fixed", **share)
            note = "random subspaces: share of the same change in 50 random 3-dimensional"
            add("interference_cone_share", 0.012, half=0.005, source="floor", note=note, **share)
        # causal, the way safegeom.audit.causal_rows writes it: at the base's carrier layer
        val = {"layer": CARRIER_LAYER, "prompts": "advbench:val vs alpaca:val", "n": 32}
        for source, keep in (("fixed", 1 - 0.7 * t), ("reextracted", 1 - 0.2 * t)):
            add("projection_separation", 3 * keep, half=0.3, carrier="refusal", source=source, **at)
            control_abl, control_add = -0.2 + rng.normal(0, 0.05), 0.1 + rng.normal(0, 0.05)
            for kind, raw, control in (
                ("ablation", -4 * keep, control_abl),
                ("addition", 5 * keep, control_add),
            ):
                base = -5.7 if (kind == "ablation" and step >= 80) else -1.0 + 0.5 * t
                cell = {"carrier": "refusal", "source": source, "saturated": base <= -5.0, **val}
                add(f"{kind}_base", base, **cell)  # every row of a cell carries `saturated`
                add(f"{kind}_raw", raw, **cell)
                add(f"{kind}_control_mean", control, **cell)
                add(f"{kind}_control_std", 0.3, **cell)
                add(f"{kind}_effect", raw - control, half=0.4, **cell)
    return frame(rows)


def two_runs() -> dict[str, pd.DataFrame]:
    """A fast-drifting LoRA run and a slowly drifting defended run."""
    return {"LoRA": synthetic_audit(), "defended": synthetic_audit(speed=0.25, seed=1)}


PLOTS = (
    plot_behaviour,
    plot_drift,
    plot_coupling,
    plot_subspace,
    plot_causal,
    plot_coordinates,
    plot_interference,
)


@pytest.fixture()
def empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("plot", PLOTS, ids=lambda p: p.__name__)
def test_every_plot_returns_a_figure_and_writes_nothing(plot, empty_cwd: Path) -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    fig = plot(two_runs())
    assert isinstance(fig, Figure)
    assert fig.axes
    assert plt.get_fignums() == before  # nothing registered in pyplot
    assert os.listdir(empty_cwd) == []


@pytest.mark.parametrize("plot", PLOTS, ids=lambda p: p.__name__)
def test_one_table_alone_is_one_run(plot) -> None:
    fig = plot(synthetic_audit())
    assert "no data" not in fig.get_suptitle()
    assert all(not _says_no_data(ax) for ax in fig.axes if ax.get_label() != "<colorbar>")


def _says_no_data(ax) -> bool:
    return any(text.get_text().startswith("no ") for text in ax.texts)


def _labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_two_runs_overlay_as_two_labelled_lines() -> None:
    fig = plot_subspace(two_runs())
    angle = fig.axes[0]
    assert _labels(angle) == ["LoRA", "defended"]
    colours = {line.get_color() for line in angle.get_lines()}
    assert len(colours) == 2
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "LoRA",
        "defended",
        "split-half floor, LoRA",
        "split-half floor, defended",
    ]
    lora, defended = (line.get_ydata() for line in angle.get_lines())
    assert lora[-1] > defended[-1]  # the LoRA run moves further


def test_behaviour_lines_per_run_and_prompt_set_with_bands() -> None:
    fig = plot_behaviour(two_runs())
    asr = fig.axes[0]
    assert _labels(asr) == [f"{run}, {p}" for run in ("LoRA", "defended") for p in HARMFUL_TEST]
    assert len(asr.collections) == 4  # one CI band per line
    assert _labels(fig.axes[1])[0] == "LoRA, alpaca:test"  # one judge per set: not repeated
    assert "ASR" in asr.get_ylabel() and "step" in asr.get_xlabel()


def test_table_without_behaviour_rows_says_so() -> None:
    tables = {"geometry-only": synthetic_audit(behaviour=False)}
    assert not has_data(tables, "fig1_behaviour")
    drawn = [name for name, spec in FIGURES.items() if not spec.anchored]  # no anchors here
    assert all(has_data(tables, name) for name in drawn if name != "fig1_behaviour")
    fig = plot_behaviour(tables)
    assert fig.get_suptitle().endswith("no data in this audit")
    assert all(_says_no_data(ax) for ax in fig.axes)
    assert "--no-generate" in fig.axes[0].texts[0].get_text()


def test_utility_falls_back_to_cross_entropy_then_says_it_is_missing() -> None:
    table = synthetic_audit()
    fig = plot_behaviour(table[table["metric"] != "task_accuracy"])
    assert "no data" not in fig.get_suptitle()
    assert [_says_no_data(ax) for ax in fig.axes] == [False, False, False]
    assert fig.axes[2].get_title() == "utility: held-out answers"
    fig = plot_behaviour(table[~table["metric"].isin(["task_accuracy", "cross_entropy"])])
    assert [_says_no_data(ax) for ax in fig.axes] == [False, False, True]


def test_drift_heatmap_is_step_by_layer_per_run_and_carrier() -> None:
    fig = plot_drift(two_runs())
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 4  # 2 runs × (refusal, harmfulness)
    image = panels[0].images[0].get_array()
    assert image.shape == (len(LAYERS), len(STEPS))
    assert np.allclose(image[:, 0], 1.0)  # the base against itself
    assert panels[0].get_title() == "LoRA, refusal direction"
    assert [t.get_text() for t in panels[0].get_xticklabels()] == [str(s) for s in STEPS]
    drift = plot_drift(synthetic_audit(), metric="direction_drift")
    assert np.allclose(drift.axes[0].images[0].get_array()[:, 0], 0.0)


def test_causal_draws_effect_against_control_band_and_net_effect() -> None:
    fig = plot_causal(two_runs())
    ablation, addition, net_ablation, net_addition = (fig.axes[i] for i in (0, 1, 2, 3))
    assert _labels(ablation) == [
        "LoRA, fixed, raw effect",
        "LoRA, random controls ± std",
        "defended, fixed, raw effect",
        "defended, random controls ± std",
    ]
    assert len(ablation.collections) == 2  # the control bands
    assert _labels(net_ablation) == [
        f"{run}, {s}, effect − controls"
        for run in ("LoRA", "defended")
        for s in ("fixed", "reextracted")
    ]
    assert "log-odds" in addition.get_ylabel()
    assert not _says_no_data(net_addition)


def test_causal_without_controls_keeps_the_net_effect() -> None:
    table = synthetic_audit()
    table = table[~table["metric"].str.contains("_raw|_control_")]
    fig = plot_causal(table)
    assert [_says_no_data(ax) for ax in fig.axes] == [True, True, False, False, False, False]


def test_coordinates_one_line_per_basis_vector() -> None:
    fig = plot_coordinates(synthetic_audit())
    assert _labels(fig.axes[0]) == ["cone[0]", "cone[1]", "cone[2]"]
    assert _labels(fig.axes[1]) == ["imbalance"]  # distinct in the figure's one legend


def test_coupling_at_the_carrier_layer_and_a_layer_profile() -> None:
    fig = plot_coupling(two_runs())
    left, right = fig.axes
    assert _labels(left) == [
        f"{run}, {c}" for run in ("LoRA", "defended") for c in ("directions h, r", "h vs cone B")
    ]
    assert f"at layer {CARRIER_LAYER}" in left.get_xlabel()
    lora_hr = left.get_lines()[0].get_ydata()
    assert np.allclose(
        lora_hr, [0.3 + 0.1 * (CARRIER_LAYER + 1) / 6 + 0.2 * s / 160 for s in STEPS]
    )
    assert _labels(right) == [
        "LoRA, step 0",
        "LoRA, step 160",
        "defended, step 0",
        "defended, step 160",
    ]
    assert len(right.get_lines()[0].get_xdata()) == len(LAYERS)


def test_rows_without_a_layer_win_then_the_carrier_layer_then_the_mean() -> None:
    table = synthetic_audit()
    summary = frame(
        [
            {
                "checkpoint": "base",
                "step": 0,
                "metric": "principal_angle_max",
                "carrier": "cone",
                "source": "reextracted",
                "value": 0.7,
            }
        ]
    )
    ax = plot_subspace(pd.concat([table, summary], ignore_index=True)).axes[0]
    assert list(ax.get_lines()[0].get_ydata()) == [0.7]
    geometry_only = table[table["metric"].isin(["principal_angle_max", "grassmann_distance"])]
    ax = plot_subspace(geometry_only).axes[0]  # no row says where the carrier layer is
    assert "mean over layers" in ax.get_xlabel()
    assert len(ax.get_lines()) == 1


def test_a_table_without_audit_columns_is_refused() -> None:
    with pytest.raises(SafegeomError, match=r"run 'x' lacks columns \['checkpoint'"):
        plot_behaviour({"x": pd.DataFrame({"metric": ["asr"], "value": [1.0]})})
    with pytest.raises(SafegeomError, match="no audit table given"):
        plot_subspace({})


def test_style_is_restored_after_a_plot() -> None:
    import matplotlib as mpl

    before = mpl.rcParams["font.size"]
    plot_behaviour(synthetic_audit())
    assert mpl.rcParams["font.size"] == before


@pytest.mark.parametrize(
    ("low", "scale"),
    [
        (0.83, (0.8, 1.0, "cividis")),
        (0.991, (0.99, 1.0, "cividis")),
        (1.0, (0.999, 1.0, "cividis")),
        (0.0, (0.0, 1.0, "cividis")),
        (-0.2, (-1.0, 1.0, "PuOr")),
    ],
)
def test_heatmap_scale_fits_the_data(low: float, scale: tuple) -> None:
    from safegeom.plots.heatmap import colour_scale

    vmin, vmax, cmap = colour_scale("cosine_to_base", [pd.DataFrame([[low, 1.0]])])
    assert (round(vmin, 6), vmax, cmap) == scale
    assert colour_scale("direction_drift", [pd.DataFrame([[0.0, 0.23]])]) == (0.0, 0.3, "cividis")
