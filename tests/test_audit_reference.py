"""The audit's base reference: r₀ by the standard selection (with the filters' fallback recorded),
h₀ and B₀ from the audit's own capture, per-layer base carriers, and the save/load round trip."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from safegeom.audit import reference as reference_module
from safegeom.audit.activations import layer_inputs
from safegeom.audit.config import AuditConfig
from safegeom.audit.geometry_rows import capture_carriers, carrier_prompts
from safegeom.audit.reference import Reference, build_reference, load_reference
from safegeom.carriers.cones import cheap_cone
from safegeom.carriers.fit import cone_basis
from safegeom.carriers.harmfulness import harmfulness_direction
from safegeom.errors import ArtifactError, NotFoundError, SafegeomError
from safegeom.geometry import principal_angles
from safegeom.models import load_model

CONFIG = AuditConfig(
    n_per_class=8,
    n_val=4,
    n_behaviour=4,
    cone_k=2,
    n_resamples=100,
    max_new_tokens=4,
    xstest=False,
)


@pytest.fixture(scope="module")
def lm(checkpoints: dict[str, Path], one_thread: None):
    return load_model(checkpoints["llama"])


@pytest.fixture(scope="module")
def ref(lm) -> Reference:
    return build_reference(lm, CONFIG, progress=False)


def test_reference_carriers(lm, ref: Reference) -> None:
    r0, h0, b0 = ref.refusal, ref.harmfulness, ref.cone
    assert r0.kind == "refusal" and r0.method == "dim" and r0.position.startswith("t_post")
    assert h0.kind == "harmfulness" and h0.position == "t_inst" and h0.layer == r0.layer
    assert b0.method == "cone-cheap" and b0.k == 2 and b0.layer == r0.layer
    torch.testing.assert_close(b0.vectors @ b0.vectors.T, torch.eye(2), atol=1e-5, rtol=0)
    assert ref.layers == tuple(range(lm.n_layers))
    assert ref.refusal_layers.shape == (lm.n_layers, lm.d_model)
    assert ref.refusal_layers.dtype == torch.float64
    assert ref.cone_layers.shape == (lm.n_layers, 2, lm.d_model)
    # the embedding layer's t_post tokens are the same for every prompt: no cone there
    assert float(ref.cone_layers[0].abs().sum()) == 0.0
    extra = ref.provenance.extra
    assert isinstance(extra["filters_passed"], bool) and "filter_train" in extra
    assert extra["filters_passed"] or "filters off" in extra["filters_note"]
    assert ref.provenance["weight_hash"] == lm.weight_hash
    assert {"position", "layer", "bypass", "kept"} <= set(ref.candidates.columns)


def test_h0_and_b0_equal_the_carrier_functions(lm, ref: Reference) -> None:
    harmful, harmless = carrier_prompts(CONFIG)
    h = harmfulness_direction(lm, harmful, harmless, layer=ref.refusal.layer)
    torch.testing.assert_close(ref.harmfulness.direction, h.direction, atol=1e-5, rtol=1e-4)
    cone = cheap_cone(lm, harmful, harmless, k=2, layer=ref.refusal.layer, score=False)
    theta = principal_angles(ref.cone.vectors, cone.vectors, hidden_size=lm.d_model)
    assert float(np.max(theta)) < 1e-3
    acts = capture_carriers(lm, CONFIG, ref.layers)
    inputs = layer_inputs(acts, ref.refusal.layer, "t_post", 2)
    fitted = cone_basis(inputs.harmful, inputs.harmless, 2, positions=inputs.positions)
    rank = fitted.scores["effective_rank"]
    assert rank == pytest.approx(cone.scores["effective_rank"], rel=1e-5)


def test_reference_round_trip(tmp_path: Path, ref: Reference) -> None:
    folder = ref.save(tmp_path / "reference")
    assert {p.name for p in folder.iterdir()} >= {
        "refusal.safetensors",
        "harmfulness.safetensors",
        "cone.safetensors",
        "layers.safetensors",
        "candidates.parquet",
        "reference.json",
    }
    back = load_reference(folder)
    for name in ("refusal", "harmfulness", "cone"):
        a, b = getattr(ref, name), getattr(back, name)
        assert torch.equal(a.vectors, b.vectors) and a.metadata() == b.metadata()
    for name in ("refusal_layers", "harmfulness_layers", "cone_layers"):
        assert torch.equal(getattr(ref, name), getattr(back, name))
    assert back.layers == ref.layers and back.provenance == ref.provenance
    assert back.candidates.equals(ref.candidates)


def test_load_reference_errors(tmp_path: Path, ref: Reference) -> None:
    with pytest.raises(NotFoundError, match="no saved audit reference"):
        load_reference(tmp_path / "missing")
    folder = ref.save(tmp_path / "bad")
    (folder / "reference.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ArtifactError, match="is not a safegeom audit reference"):
        load_reference(folder)
    with pytest.raises(SafegeomError, match="rebuild it with these layers"):
        ref.layer_index(99)


def test_filters_fallback_is_recorded(lm, monkeypatch: pytest.MonkeyPatch) -> None:
    """No candidate passes (min_induce = inf): the lowest-bypass candidate is used, and said."""
    strict = reference_module.selection_config

    def impossible(config: AuditConfig):
        return dataclasses.replace(strict(config), min_induce=float("inf"))

    monkeypatch.setattr(reference_module, "selection_config", impossible)
    ref = build_reference(lm, dataclasses.replace(CONFIG, layers="1"), progress=False)
    extra = ref.provenance.extra
    assert extra["filters_passed"] is False and "filters off" in extra["filters_note"]
    kept = ref.candidates[ref.candidates["kept"]]
    best = kept.sort_values("bypass").iloc[0]
    assert (ref.refusal.layer, ref.refusal.position) == (int(best.layer), best.position)
    assert ref.layers == tuple(sorted({1, ref.refusal.layer}))

    def open_filters(config: AuditConfig):
        return dataclasses.replace(strict(config), max_kl=float("inf"), min_induce=float("-inf"))

    monkeypatch.setattr(reference_module, "selection_config", open_filters)
    passed = build_reference(lm, dataclasses.replace(CONFIG, layers="1"), progress=False)
    assert passed.provenance.extra["filters_passed"] is True
    assert torch.equal(passed.refusal.vectors, ref.refusal.vectors)
