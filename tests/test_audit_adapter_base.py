"""An adapter whose base_model_name_or_path does not exist here: --base wins, and without it the
first error says where the path came from and names --base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from safegeom.audit.inputs import resolve_inputs
from safegeom.cli import main
from safegeom.errors import ConfigError, NotFoundError
from safegeom.models.loading import LoadConfig, load_model
from tests.audit_fakes import install
from tests.audit_helpers import adapter
from tests.tiny_models import build_checkpoint

GONE = "/nonexistent/tiny-chat"
"""The base path an adapter trained on another machine names."""
FAST = ["--no-generate", "--families", "geometry", "--no-xstest", "--n-per-class", "4"]
FAST += ["--n-val", "4", "--n-resamples", "100", "--no-progress"]


def _moved(source: Path, dest: Path) -> Path:
    """A copy of adapter ``source`` whose adapter_config.json names a base not on this machine."""
    shutil.copytree(source, dest)
    file = dest / "adapter_config.json"
    config = json.loads(file.read_text())
    config["base_model_name_or_path"] = GONE
    file.write_text(json.dumps(config))
    return dest


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapter-base")
    base = build_checkpoint(root, "llama")
    here = adapter(base, root / "here" / "step-000002", 0.1, seed=2)
    moved = _moved(here, root / "moved" / "step-000002")
    trainer = root / "trainer"
    _moved(here, trainer / "checkpoint-2")
    return {"base": base, "here": here, "moved": moved, "trainer": trainer}


def test_base_wins_over_the_adapters_own(models) -> None:
    inputs = resolve_inputs([str(models["moved"])], base=str(models["base"]))
    assert inputs.base.path == str(models["base"])
    (target,) = inputs.checkpoints
    assert (target.form, target.base) == ("adapter", str(models["base"]))
    listed = resolve_inputs([str(models["base"]), str(models["here"])])
    assert listed.checkpoints[0].base is None  # no --base: the adapter's own base, unchanged


@pytest.mark.parametrize("form", ["single", "trainer", "list"])
def test_without_base_the_error_names_adapter_config_and_base(models, form) -> None:
    paths = {
        "single": [str(models["moved"])],
        "trainer": [str(models["trainer"])],
        "list": [str(models["base"]), str(models["moved"])],
    }[form]
    with pytest.raises(NotFoundError) as caught:
        resolve_inputs(paths)
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert f"{GONE}: no such folder" in message
    assert "base_model_name_or_path in" in message and "adapter_config.json" in message
    assert "pass --base MODEL" in message


def test_load_model_puts_the_adapter_on_the_given_base(models) -> None:
    torch.set_num_threads(1)
    on_given = load_model(models["moved"], LoadConfig(adapter_base=models["base"]))
    on_own = load_model(models["here"])
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(on_given.model(ids).logits, on_own.model(ids).logits)
    with pytest.raises(
        NotFoundError, match=r"pass LoadConfig\(adapter_base=...\) \(safegeom audit: --base\)"
    ):
        load_model(models["moved"])
    with pytest.raises(
        ConfigError, match=r"is not an adapter folder .*; drop LoadConfig.adapter_base"
    ):
        load_model(models["base"], LoadConfig(adapter_base=models["base"]))


def test_cli_audits_a_moved_adapter_with_base(models, tmp_path, monkeypatch, capsys) -> None:
    install(monkeypatch)
    args = ["audit", str(models["moved"]), "--base", str(models["base"]), "--out"]
    assert main([*args, str(tmp_path / "a"), *FAST]) == 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    (record,) = manifest["inputs"]["checkpoints"]
    assert (record["form"], record["base"]) == ("adapter", str(models["base"]))
    capsys.readouterr()
    assert main(["audit", str(models["moved"]), "--out", str(tmp_path / "b"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "adapter_config.json" in err and "--base" in err
