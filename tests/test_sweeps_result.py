"""Sweep results save and load with config and provenance; CLI carrier names never collide."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from safegeom.carriers import Carrier
from safegeom.cli.sweep import carrier_names
from safegeom.errors import ArtifactError, ConfigError, NotFoundError
from safegeom.interventions import vectors_hash
from safegeom.models import LoadConfig, LoadedModel, load_model
from safegeom.sweeps import AblateLayers, SweepConfig, SweepResult, causal_sweep_result
from tests.test_sweeps import HARMFUL, HARMLESS

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = SweepConfig(
    ops=("ablate", "add"),
    add_layers="1",
    add_strengths=(1.0,),
    ablate_layers=AblateLayers(("all", "0:2")),
    n_random=2,
    n_prompts=2,
    n_resamples=20,
)


@pytest.fixture(scope="module")
def lm(checkpoints: dict[str, Path]) -> LoadedModel:
    return load_model(checkpoints["llama"], LoadConfig(device="cpu"))


def _carrier(lm: LoadedModel, seed: int) -> Carrier:
    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(seed))
    return Carrier(vectors=v, kind="refusal", method="dim", layer=1, position="t_post[-1]")


def test_sweep_result_round_trips_with_provenance(lm: LoadedModel, tmp_path: Path) -> None:
    carriers = {"a": _carrier(lm, 0), "b": _carrier(lm, 1)}
    result = causal_sweep_result(lm, carriers, HARMFUL, HARMLESS, CONFIG, progress=False)
    assert set(result.table.carrier) == {"a", "b"} and len(result.table) == 2 * 3 * 2
    prov = result.provenance
    assert prov.model == lm.name and prov.weight_hash == lm.weight_hash
    assert len(prov.prompt_sets) == 1  # both inline lists are named "inline"
    assert prov["carriers"]["a"]["sha256"] == vectors_hash(carriers["a"])
    assert prov["carriers"]["b"]["layer"] == 1 and prov.config["ablate_layers"] == "all;0:2"
    written = result.save(tmp_path / "out" / "sweep.parquet")
    assert written.is_file() and written.with_suffix(".json").is_file()
    for source in (written, written.with_suffix(".json")):
        loaded = SweepResult.load(source)
        assert loaded == result and loaded.config == CONFIG
    folder = result.save(tmp_path / "folder")
    assert folder == tmp_path / "folder" / "sweep.parquet"
    assert SweepResult.load(tmp_path / "folder") == result
    sidecar = json.loads(written.with_suffix(".json").read_text())
    assert sidecar["format"] == "safegeom.sweep/1" and sidecar["n_rows"] == len(result.table)


def test_sweep_result_bad_files(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no safegeom sweep sidecar"):
        SweepResult.load(tmp_path / "none.parquet")
    (tmp_path / "x.json").write_text('{"format": "other"}')
    with pytest.raises(ArtifactError, match="is not a safegeom sweep"):
        SweepResult.load(tmp_path / "x.json")


def test_carrier_names_are_unique() -> None:
    names = carrier_names(["ck1/refusal.safetensors", "ck2/refusal.safetensors", "x/other.st"])
    assert list(names) == ["ck1/refusal", "ck2/refusal", "other"]
    named = carrier_names(["base=ck1/refusal.safetensors", "tuned=ck2/refusal.safetensors"])
    assert named == {
        "base": Path("ck1/refusal.safetensors"),
        "tuned": Path("ck2/refusal.safetensors"),
    }
    with pytest.raises(ConfigError, match="two carriers are both named 'r'"):
        carrier_names(["r=a.safetensors", "r=b.safetensors"])
    with pytest.raises(ConfigError, match="both named 'a/refusal'"):
        carrier_names(["a/refusal.safetensors", "a/refusal.safetensors"])


def test_sweep_config_messages_name_flags() -> None:
    with pytest.raises(ConfigError, match=r"n_prompts \(--n-prompts\) must be at least 1"):
        SweepConfig(n_prompts=0)
    with pytest.raises(ConfigError, match=r"ablate_strengths \(--ablate-strengths\) needs"):
        SweepConfig(ablate_strengths=())
    with pytest.raises(ConfigError, match="--ablate-layers needs at least one layer spec"):
        AblateLayers.parse(" ; ")
    assert SweepConfig(ablate_layers="all;1-2").ablate_layers == ("all", "1-2")
    assert SweepConfig(ops=["add"], add_strengths=[1]).add_strengths == (1.0,)
