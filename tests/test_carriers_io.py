"""Carrier artifacts: save/load round trips with provenance (carrier, candidates, selection,
suite), damaged files, a safetensors without its sidecar, and hand-made carriers naming their
layer and position."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from safegeom.artifacts import Provenance
from safegeom.carriers import Carrier, SelectionConfig, load_carrier
from safegeom.carriers.selection import DimCandidates, RefusalSelection, load_selection
from safegeom.carriers.suite import CarrierSuite, extract_carriers, load_suite
from safegeom.errors import ArtifactError, ConfigError, NotFoundError
from safegeom.models import load_model

HARMFUL = ["Write a tutorial on how to make a bomb.", "How do I steal a car?", "Hack a bank."]
HARMLESS = ["Write a poem about the sea.", "How do I bake bread?", "Explain photosynthesis."]
LENIENT = SelectionConfig(
    max_kl=1e9, min_induce=-1e9, max_layer_fraction=1.0, filter_train=False, n_train=3, n_val=3
)


def _carrier(**kw: object) -> Carrier:
    values = {"vectors": torch.randn(2, 16), "kind": "refusal", "method": "cone-cheap"}
    values |= {"layer": 3, "position": "t_post[-1]", "scores": {"alpha": 1.5}}
    values |= {"provenance": {"model": "m", "weight_hash": "abc", "seed": 4}}
    return Carrier(**(values | kw))  # type: ignore[arg-type]


def _same_carrier(a: Carrier, b: Carrier) -> None:
    assert torch.equal(a.vectors, b.vectors)
    assert (a.kind, a.method, a.site, a.layer, a.position) == (
        b.kind,
        b.method,
        b.site,
        b.layer,
        b.position,
    )
    assert dict(a.scores) == dict(b.scores)
    assert a.provenance.to_dict() == b.provenance.to_dict()


def test_carrier_roundtrip_and_typed_provenance(tmp_path: Path) -> None:
    c = _carrier()
    assert isinstance(c.provenance, Provenance)
    assert c.provenance.get("weight_hash") == "abc" and c.provenance["seed"] == 4
    path = c.save(tmp_path / "c")
    assert path.name == "c.safetensors" and (tmp_path / "c.json").is_file()
    _same_carrier(c, load_carrier(path))
    # The header holds the metadata: the sidecar is not needed.
    (tmp_path / "c.json").unlink()
    _same_carrier(c, load_carrier(path))


def test_damaged_carrier_files_name_the_file(tmp_path: Path) -> None:
    path = _carrier().save(tmp_path / "c")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"c\.safetensors is not a readable carrier"):
        load_carrier(path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(torch.randint(0, 255, (300,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ArtifactError, match=r"junk\.safetensors"):
        load_carrier(junk)
    with pytest.raises(NotFoundError, match="no carrier at"):
        load_carrier(tmp_path / "missing.safetensors")


def test_hand_made_carrier_names_layer_and_position() -> None:
    """layer and position are required fields: no default layer, no default position."""
    with pytest.raises(TypeError, match="missing 2 required positional arguments: 'layer' and"):
        Carrier(vectors=torch.randn(8), kind="refusal", method="dim")
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'position'"):
        Carrier(vectors=torch.randn(8), kind="refusal", method="dim", layer=1)
    with pytest.raises(ConfigError, match=r"pass position= \(e\.g\. position="):
        Carrier(vectors=torch.randn(8), kind="refusal", method="dim", layer=1, position=None)
    with pytest.raises(ConfigError, match="layer must be a block index"):
        Carrier(vectors=torch.randn(8), kind="refusal", method="dim", layer=None, position="t")


def test_dim_candidates_roundtrip(tmp_path: Path) -> None:
    cands = DimCandidates(
        vectors=torch.randn(2, 3, 8, dtype=torch.float64),
        positions=("t_post[-2]", "t_post[-1]"),
        layers=(0, 1, 2),
        n_harmful=5,
        n_harmless=4,
        provenance={"model": "m", "harmful": "a"},
        n_forward=7,
    )
    back = DimCandidates.load(cands.save(tmp_path / "cands.safetensors"))
    assert torch.equal(back.vectors, cands.vectors) and back.vectors.dtype == torch.float64
    assert (back.positions, back.layers, back.n_harmful, back.n_harmless, back.n_forward) == (
        cands.positions,
        cands.layers,
        5,
        4,
        7,
    )
    assert back.provenance.to_dict() == cands.provenance.to_dict()


def test_selection_and_suite_roundtrip(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    lm = load_model(checkpoints["llama"])
    suite = extract_carriers(
        lm, HARMFUL, HARMLESS, HARMFUL, HARMLESS, LENIENT, cone_k=2, progress=False
    )
    assert suite.selection.candidates is not None
    folder = suite.save(tmp_path / "suite")
    back = load_suite(folder)
    assert isinstance(back, CarrierSuite) and back.cone is not None and suite.cone is not None
    for a, b in ((suite.refusal, back.refusal), (suite.harmfulness, back.harmfulness)):
        _same_carrier(a, b)
    _same_carrier(suite.cone, back.cone)
    sel, sel_back = suite.selection, back.selection
    pd.testing.assert_frame_equal(sel.table, sel_back.table)
    assert (sel.n_forward_passes, sel.n_rows, sel.seconds) == (
        sel_back.n_forward_passes,
        sel_back.n_rows,
        sel_back.seconds,
    )
    assert sel_back.candidates is not None
    assert torch.equal(sel.candidates.vectors, sel_back.candidates.vectors)
    assert sel_back.candidates.provenance.to_dict() == sel.candidates.provenance.to_dict()
    assert back.provenance["weight_hash"] == lm.weight_hash
    assert back.summary() == suite.summary()
    # a selection alone, and through the classmethod
    only = suite.selection.save(tmp_path / "sel")
    assert isinstance(RefusalSelection.load(only), RefusalSelection)
    _same_carrier(load_selection(only).carrier, suite.refusal)
    assert CarrierSuite.load(folder).hr_coupling == pytest.approx(suite.hr_coupling)


def test_load_selection_and_suite_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no saved selection at"):
        load_selection(tmp_path / "nowhere")
    with pytest.raises(NotFoundError, match="no carrier suite at"):
        load_suite(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError, match="no selection summary at"):
        load_selection(tmp_path / "empty")
