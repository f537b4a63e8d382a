"""Captured activations, moments and statistics save and load back with their provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from safegeom.activations import CaptureConfig, capture, capture_stats, capture_to_disk
from safegeom.activations.values import ActivationStats, load_activations
from safegeom.artifacts import Provenance, read_json, read_safetensors
from safegeom.errors import ArtifactError, NotFoundError, SafegeomError
from safegeom.models import load_model
from safegeom.stats import Moments, RunningStats

PROMPTS = ["Write a poem about the sea.", "Hi.", "How do I bake bread at home?", "Name a fruit."]
KWARGS = {"sites": "resid_pre,attn_out", "layers": "0,2", "positions": "t_inst,t_post"}


def _stable(prov: Provenance) -> dict:
    """The provenance without the fields that differ between two runs (time)."""
    return {k: v for k, v in prov.to_dict().items() if k != "created"}


@pytest.fixture(scope="module")
def lm(checkpoints: dict[str, Path]):
    return load_model(checkpoints["gpt_neox"])


def test_activations_provenance_is_typed(lm) -> None:
    acts = capture(lm, PROMPTS, CaptureConfig(**KWARGS), progress=False)
    prov = acts.provenance
    assert isinstance(prov, Provenance)
    assert prov.model == str(lm.name) and prov.weight_hash == lm.weight_hash
    assert list(prov.prompt_sets) == ["inline"] and prov.prompt_sets["inline"]
    assert prov.config["layers"] == "0,2" and prov.config["backend"] == "hooks"
    assert prov.extra["sites"] == ["resid_pre", "attn_out"] and prov.extra["layers"] == [0, 2]
    assert prov.extra["positions"] == list(acts.positions) and prov.extra["n_prompts"] == 4
    assert prov.extra["dtype"] == "float32" and prov.extra["template_hash"]
    assert prov.extra["system"] is None and prov.extra["backend"] == "hooks"


def test_activations_round_trip(lm, tmp_path: Path) -> None:
    acts = capture(lm, PROMPTS, CaptureConfig(**KWARGS), progress=False)
    path = acts.save(tmp_path / "a" / "acts.safetensors")
    back = load_activations(path)
    assert (
        back.provenance == acts.provenance
        and back.provenance.to_dict() == acts.provenance.to_dict()
    )
    assert back.layers == acts.layers and back.positions == acts.positions
    for site in acts.sites:
        assert torch.equal(back[site], acts[site])
    sidecar = read_json(f"{path}.json")
    _, header = read_safetensors(path)
    assert sidecar == header and sidecar["provenance"] == acts.provenance.to_dict()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_sharded_round_trip(lm, tmp_path: Path) -> None:
    acts = capture(lm, PROMPTS, CaptureConfig(batch_size=2, **KWARGS), progress=False)
    folder = capture_to_disk(
        lm,
        PROMPTS,
        tmp_path / "sh",
        CaptureConfig(shard_size=2, batch_size=2, **KWARGS),
        progress=False,
    )
    back = load_activations(folder)
    assert _stable(back.provenance) == {
        **_stable(acts.provenance),
        "config": {**acts.provenance.config, "shard_size": 2},
    }
    assert back.layers == acts.layers and back.positions == acts.positions
    for site in acts.sites:
        assert torch.equal(back[site], acts[site])
    index = json.loads((folder / "activations.json").read_text())
    assert index["shards"] == ["shard-00000.safetensors", "shard-00001.safetensors"]


def test_activation_stats_round_trip(lm, tmp_path: Path) -> None:
    stats = capture_stats(
        lm,
        PROMPTS,
        CaptureConfig(stats=True, covariance=True, batch_size=3, **KWARGS),
        progress=False,
    )
    path = stats.save(tmp_path / "stats.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "stats.safetensors",
        "stats.safetensors.json",
    ]
    tensors, meta = read_safetensors(path)
    assert sorted(tensors) == ["attn_out.cov", "attn_out.mean", "resid_pre.cov", "resid_pre.mean"]
    sidecar = read_json(f"{path}.json")
    assert sidecar == meta and sidecar["n"] == 4 and sidecar["layers"] == [0, 2]
    assert sidecar["sites"] == ["resid_pre", "attn_out"] and sidecar["positions"] == list(
        stats.positions
    )
    back = ActivationStats.load(path)
    assert back.provenance == stats.provenance and back.n_forward == stats.n_forward == 2
    assert back.layers == stats.layers and back.positions == stats.positions and back.n == 4
    for site in stats.sites:
        assert torch.equal(back.mean(site), stats.mean(site))
        assert torch.equal(back.moments[site].cov, stats.moments[site].cov)
    means_only = capture_stats(lm, PROMPTS, CaptureConfig(**KWARGS), progress=False)
    again = ActivationStats.load(means_only.save(tmp_path / "means.safetensors"))
    assert all(m.cov is None for m in again.moments.values())
    assert again.provenance == means_only.provenance


def test_moments_round_trip_through_the_artifact_layer(tmp_path: Path) -> None:
    running = RunningStats((2, 3), covariance=True)
    running.update(torch.randn(5, 2, 3))
    moments = running.finalize()
    path = moments.save(tmp_path / "m.safetensors")
    tensors, meta = read_safetensors(path)
    assert sorted(tensors) == ["cov", "mean"]
    assert meta["format"] == "safegeom.moments/1" and meta["has_cov"] is True
    back = Moments.load(path)
    assert torch.equal(back.mean, moments.mean) and torch.equal(back.cov, moments.cov)
    assert (back.n, back.ddof) == (5, 1)


def test_old_activation_files_still_load(tmp_path: Path) -> None:
    old = {
        "model": "tiny",
        "weight_hash": "abc",
        "prompt_set": "advbench:val",
        "prompt_hash": "h1",
        "n_prompts": 2,
        "sites": ["resid_pre"],
        "layers": [1],
        "positions": ["last"],
        "dtype": "float32",
        "template_hash": "t",
        "system": None,
        "backend": "hooks",
        "version": "0.1.0",
    }
    meta = {
        "format": "safegeom.activations.values/1",
        "layers": [1],
        "positions": ["last"],
        "provenance": old,
    }
    path = tmp_path / "old.safetensors"
    save_file({"resid_pre": torch.zeros(2, 1, 1, 4)}, str(path), {"safegeom": json.dumps(meta)})
    back = load_activations(path)
    assert back.provenance.prompt_sets == {"advbench:val": "h1"}
    assert back.provenance["n_prompts"] == 2 and back.provenance.weight_hash == "abc"


def test_unreadable_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(ArtifactError, match="not a readable activations"):
        load_activations(bad)
    with pytest.raises(ArtifactError, match="not a readable activation statistics"):
        ActivationStats.load(bad)
    with pytest.raises(NotFoundError, match="no activation statistics at"):
        ActivationStats.load(tmp_path / "missing.safetensors")
    (tmp_path / "folder").mkdir()
    with pytest.raises(NotFoundError, match="no activations index at"):
        load_activations(tmp_path / "folder")


def test_activations_lookup_errors(lm) -> None:
    acts = capture(lm, PROMPTS, CaptureConfig(**KWARGS), progress=False)
    assert acts.layer_index(-1) == 1 and acts.layer_index(2) == 1
    with pytest.raises(SafegeomError, match=r"layer -3 was not captured; captured: \[0, 2\]"):
        acts.layer_index(-3)
    with pytest.raises(SafegeomError, match="layer 1 was not captured"):
        acts.select("resid_pre", 1, "t_inst")
    with pytest.raises(SafegeomError, match="position 'last' not captured"):
        acts.select("resid_pre", 0, "last")
    with pytest.raises(NotFoundError, match="site 'mlp_out' was not captured"):
        acts["mlp_out"]
