"""Audit inputs: run folders, BASE CKPT lists, HF Trainer folders, and each bad input's message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from safegeom.audit.config import AuditConfig
from safegeom.audit.inputs import check_prompt_sets, resolve_inputs, step_of
from safegeom.errors import (
    ArtifactError,
    ConfigError,
    ModelLoadError,
    NotFoundError,
    SafegeomError,
)
from tests.audit_helpers import adapter, run_folder
from tests.tiny_models import build_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    llama = build_checkpoint(root, "llama")
    gpt2 = build_checkpoint(root, "gpt2")
    wide = root / "wide"
    shutil.copytree(llama, wide)
    config = json.loads((wide / "config.json").read_text())
    config["hidden_size"] = 48
    (wide / "config.json").write_text(json.dumps(config))
    return {"llama": llama, "gpt2": gpt2, "wide": wide, "lora": adapter(llama, root / "lora", 0.1)}


def test_step_of_reads_names() -> None:
    assert step_of("step-000040") == 40
    assert step_of("checkpoint-9") == 9
    assert step_of("final") is None


def test_run_folder_gives_base_checkpoints_and_task(models, tmp_path: Path) -> None:
    llama = models["llama"]
    root = run_folder(tmp_path / "run", llama, {0: llama, 4: llama, 2: llama})
    inputs = resolve_inputs([root])
    assert inputs.source == "trajectory"
    assert inputs.base.path == str(llama) and inputs.base.step == 0
    assert [(t.label, t.step) for t in inputs.checkpoints] == [
        ("step-000002", 2),
        ("step-000004", 4),
    ]  # the step-0 checkpoint is the base itself
    assert inputs.task == "arith:8"


def test_base_ckpt_list_orders_by_named_step_else_by_position(models, tmp_path: Path) -> None:
    llama = models["llama"]
    for name in ("step-000020", "step-000005"):
        shutil.copytree(llama, tmp_path / name)
    named = resolve_inputs([llama, tmp_path / "step-000020", tmp_path / "step-000005"])
    assert [(t.label, t.step) for t in named.checkpoints] == [
        ("step-000005", 5),
        ("step-000020", 20),
    ]
    plain = resolve_inputs([llama, llama, models["lora"]])
    assert [t.step for t in plain.checkpoints] == [1, 2]
    assert [t.form for t in plain.checkpoints] == ["full", "adapter"]
    assert len({t.label for t in plain.targets}) == 3  # labels stay unique


def test_trainer_folder_is_detected_and_ordered_by_step(models, tmp_path: Path) -> None:
    out = tmp_path / "trainer"
    for n in (10, 9, 2):
        shutil.copytree(models["lora"], out / f"checkpoint-{n}")
    inputs = resolve_inputs([out])
    assert inputs.source == "trainer"
    assert [t.label for t in inputs.checkpoints] == [
        "checkpoint-2",
        "checkpoint-9",
        "checkpoint-10",
    ]
    assert [t.step for t in inputs.checkpoints] == [2, 9, 10]
    assert inputs.base.path == str(models["llama"])  # from the adapter's base_model_name_or_path


def test_trainer_folder_of_full_checkpoints_needs_base(models, tmp_path: Path) -> None:
    out = tmp_path / "trainer"
    shutil.copytree(models["llama"], out / "checkpoint-3")
    with pytest.raises(ConfigError, match=r"full models, so the base is not known; name the"):
        resolve_inputs([out])
    assert resolve_inputs([out], base=str(models["llama"])).checkpoints[0].step == 3


def test_checkpoint_of_another_architecture_fails(models) -> None:
    with pytest.raises(ConfigError, match=r"is a gpt2 model .*but the base .* is a llama model"):
        resolve_inputs([models["llama"], models["gpt2"]])


def test_checkpoint_of_another_hidden_size_fails(models) -> None:
    with pytest.raises(ConfigError, match=r"has hidden size 48, but the base .* has 32"):
        resolve_inputs([models["llama"], models["wide"]])


def test_missing_checkpoint_folder_fails(models, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"checkpoint .*/nope: no such folder"):
        resolve_inputs([models["llama"], tmp_path / "nope"])


def test_unloadable_checkpoint_folder_fails(models, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"neither config.json nor adapter_config.json"):
        resolve_inputs([models["llama"], tmp_path / "empty"])
    broken = tmp_path / "broken"
    shutil.copytree(models["llama"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(
        ModelLoadError, match=r"broken cannot be loaded: .*not a readable safetensors"
    ):
        resolve_inputs([models["llama"], broken])
    bad_config = tmp_path / "bad-config"
    shutil.copytree(models["llama"], bad_config)
    (bad_config / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"cannot read its config.json"):
        resolve_inputs([models["llama"], bad_config])


def test_missing_checkpoint_of_a_run_fails(models, tmp_path: Path) -> None:
    root = run_folder(tmp_path / "run", models["llama"], {0: models["llama"], 3: models["llama"]})
    shutil.rmtree(root / "checkpoints" / "step-000003")
    with pytest.raises(NotFoundError, match=r"step-000003 .*listed in .*trajectory.json.* missing"):
        resolve_inputs([root])


def test_empty_trajectory_fails(models, tmp_path: Path) -> None:
    root = run_folder(tmp_path / "run", models["llama"], {0: models["llama"]})
    with pytest.raises(ArtifactError, match=r"is empty: it holds no checkpoint after step 0"):
        resolve_inputs([root])
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ArtifactError, match=r"holds no checkpoints: no trajectory.json and no"):
        resolve_inputs([tmp_path / "nothing"])


def test_single_model_without_checkpoints_fails(models) -> None:
    with pytest.raises(ConfigError, match=r"is a single model; give BASE CKPT"):
        resolve_inputs([models["llama"]])


def test_prompt_set_with_no_prompts_fails(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"--harmful: prompt file .*empty.jsonl' is empty"):
        check_prompt_sets(AuditConfig(harmful=(str(empty),)))
    check_prompt_sets(AuditConfig())  # the defaults all load


def test_single_adapter_names_its_base(models) -> None:
    inputs = resolve_inputs([models["lora"]])
    assert inputs.base.path == str(models["llama"])
    assert [(t.form, t.step) for t in inputs.checkpoints] == [("adapter", 1)]
    with_base = resolve_inputs([models["lora"]], base=str(models["llama"]))
    assert with_base.checkpoints == inputs.checkpoints


def test_a_refusalguard_checkpoint_is_audited_against_its_base(
    models: dict[str, Path], tmp_path: Path
) -> None:
    import torch

    from safegeom.models import load_model
    from safegeom.models.reft import ReftConfig, ReftEdit

    lm = load_model(models["llama"])
    basis = torch.linalg.qr(torch.randn(lm.d_model, 2, generator=torch.Generator().manual_seed(0)))
    edit = ReftEdit.for_model(lm, ReftConfig(layers=(1,), rank=2), {1: basis[0]}, seed=0)
    edit.save(tmp_path / "guard", base=str(models["llama"]))
    inputs = resolve_inputs([models["llama"], tmp_path / "guard"])
    assert [t.form for t in inputs.checkpoints] == ["refusalguard"]
    edit.save(tmp_path / "wide-guard", base=str(models["wide"]))  # names a base of other width
    with pytest.raises(SafegeomError, match="hidden"):
        resolve_inputs([models["llama"], tmp_path / "wide-guard"])
