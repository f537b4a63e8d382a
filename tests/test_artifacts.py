"""The artifact layer: atomic writes, the user's umask, readable errors, typed provenance."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from safegeom.artifacts import (
    Provenance,
    atomic_write,
    check_output_dir,
    check_output_file,
    read_json,
    read_safetensors,
    save_parquet,
    save_safetensors,
    sha256_text,
    write_json,
)
from safegeom.errors import ArtifactError, NotFoundError, OutputPathError


def test_json_round_trip_and_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "deep" / "r.json", {"b": [1, 2], "a": Path("x")})
    finally:
        os.umask(old)
    assert read_json(path) == {"a": "x", "b": [1, 2]}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = write_json(tmp_path / "r.json", {"v": 1})
    with pytest.raises(RuntimeError, match="boom"), atomic_write(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert read_json(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_safetensors_and_parquet_round_trip(tmp_path: Path) -> None:
    tensors = {"x": torch.arange(6.0).view(2, 3)}
    path = save_safetensors(tmp_path / "t.safetensors", tensors, {"k": [1, "a"]})
    back, meta = read_safetensors(path)
    assert torch.equal(back["x"], tensors["x"]) and meta == {"k": [1, "a"]}
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    pd.testing.assert_frame_equal(
        pd.read_parquet(save_parquet(tmp_path / "f.parquet", frame)), frame
    )


def test_unreadable_files_say_what_they_are(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no carrier at"):
        read_json(tmp_path / "none.json", what="carrier")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ArtifactError, match=r"bad\.json is not a readable sweep"):
        read_json(bad, what="sweep")
    path = save_safetensors(tmp_path / "t.safetensors", {"x": torch.ones(100)}, {})
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(ArtifactError, match="truncated or not safetensors"):
        read_safetensors(path)
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.ones(2)}, str(plain))
    with pytest.raises(ArtifactError, match="holds no safegeom metadata"):
        read_safetensors(plain, what="carrier")


def test_output_locations_are_checked_before_work(tmp_path: Path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(OutputPathError, match="is a folder; give a file path"):
        check_output_file(tmp_path)
    with pytest.raises(OutputPathError, match="is a file; give a folder"):
        check_output_dir(a_file)
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        check_output_file(a_file / "below" / "out.json", option="--out")
    with pytest.raises(OutputPathError, match=r"--out /proc/safegeom-none/x\.json: cannot write"):
        check_output_file("/proc/safegeom-none/x.json")
    assert check_output_dir(tmp_path / "new" / "run").is_dir()
    assert list((tmp_path / "new" / "run").iterdir()) == []  # the probe is gone


def test_provenance_is_a_mapping_that_round_trips() -> None:
    prov = Provenance(model="tiny-chat", weight_hash="ab", prompt_sets={"advbench:val": "h"})
    prov = prov.with_extra(layers=[1, 2], seed=0)
    assert prov["weight_hash"] == "ab" and prov["layers"] == [1, 2] and {**prov}["seed"] == 0
    assert prov.version and prov.created
    back = Provenance.from_dict(json.loads(json.dumps(prov.to_dict())))
    assert back == prov and hash(back) == hash(prov)
    old = Provenance.from_dict({"model": "m", "n_harmful": 3})  # unknown keys go to extra
    assert old.extra == {"n_harmful": 3} and old["n_harmful"] == 3


@given(st.text())
def test_sha256_text_is_the_hex_digest(text: str) -> None:
    import hashlib

    assert sha256_text(text) == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert sha256_text(None) == ""


def test_format_tags_and_parquet_errors(tmp_path: Path) -> None:
    from safegeom.artifacts import read_parquet

    path = write_json(tmp_path / "s.json", {"format": "safegeom.other/1"})
    assert read_json(path, format="safegeom.other/1") == {"format": "safegeom.other/1"}
    with pytest.raises(ArtifactError, match=r"is not a sweep \(format 'safegeom.other/1'\)"):
        read_json(path, what="sweep", format="safegeom.sweep/1")
    with pytest.raises(NotFoundError, match="no audit table at"):
        read_parquet(tmp_path / "none.parquet", what="audit table")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ArtifactError, match="is not a readable audit table"):
        read_parquet(tmp_path / "bad.parquet", what="audit table")


def test_version_has_one_source() -> None:
    """pyproject.toml's version reaches __version__ and Provenance; no module writes it again."""
    import importlib.metadata
    import re

    import safegeom

    root = Path(safegeom.__file__).resolve().parent
    declared = re.search(r'^version = "(.+)"$', (root.parent / "pyproject.toml").read_text(), re.M)
    assert declared is not None
    assert safegeom.__version__ == importlib.metadata.version("safegeom") == declared.group(1)
    assert Provenance().version == safegeom.__version__
    literal = f'"{safegeom.__version__}"'
    copies = [p.name for p in root.rglob("*.py") if literal in p.read_text(encoding="utf-8")]
    assert copies == []
