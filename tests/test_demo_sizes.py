"""``safegeom demo``'s per-model sizes (DEMO_PRESETS), and the adapter path smol-chat takes: an
adapter model is merged into its base before the harmful LoRA (train refuses an adapter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from safegeom.cli import build_parser
from safegeom.cli.options import config_from_args
from safegeom.config import field_docs
from safegeom.demo import DEMO_PRESETS, MERGED_DIR, SIZE_FIELDS, DemoConfig, run_demo
from safegeom.errors import ConfigError
from safegeom.models import load_model
from safegeom.models.merged import is_adapter_spec, save_merged
from safegeom.training import TrainConfig, load_trajectory, train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(n_eval=4, n_train=8, n_val=4, n_random=2, lora_steps=2, save_every=1, max_new_tokens=6)


def test_unset_sizes_come_from_the_models_preset_and_given_ones_win() -> None:
    assert DemoConfig().resolved() == DemoConfig(**DEMO_PRESETS["tiny-chat"])
    smol = DemoConfig(model="smol-chat").resolved()
    assert {name: getattr(smol, name) for name in SIZE_FIELDS} == DEMO_PRESETS["smol-chat"]
    assert DEMO_PRESETS["smol-chat"] != DEMO_PRESETS["tiny-chat"]
    given = DemoConfig(model="smol-chat", n_val=3, lora_steps=7).resolved()
    assert (given.n_val, given.lora_steps) == (3, 7)
    assert given.n_eval == DEMO_PRESETS["smol-chat"]["n_eval"]
    other = DemoConfig(model="/some/checkpoint")
    assert (
        other.preset == "tiny-chat" and other.resolved().n_val == DEMO_PRESETS["tiny-chat"]["n_val"]
    )
    with pytest.raises(ConfigError, match="n_val"):
        DemoConfig(n_val=0)


def test_the_cli_leaves_unset_sizes_to_the_preset_and_flags_override_them() -> None:
    parser = build_parser()
    args = parser.parse_args(["demo", "--model", "smol-chat", "--n-val", "5", "--no-audit"])
    config = config_from_args(DemoConfig, args)
    assert config.n_val == 5 and config.n_eval is None and config.audit is False
    resolved = config.resolved()
    assert resolved.n_val == 5 and resolved.n_eval == DEMO_PRESETS["smol-chat"]["n_eval"]
    plain = config_from_args(DemoConfig, parser.parse_args(["demo"]))
    assert plain.resolved() == DemoConfig(**DEMO_PRESETS["tiny-chat"])


def test_each_size_field_documents_its_preset_values() -> None:
    """The --help text of a size names the value each preset gives it."""
    docs = field_docs(DemoConfig)
    for name in SIZE_FIELDS:
        values = {model: sizes[name] for model, sizes in DEMO_PRESETS.items()}
        doc = " ".join(docs[name].split())
        if len(set(values.values())) == 1:
            assert f"preset; {values['tiny-chat']})" in doc, name
        else:
            for model, value in values.items():
                assert f"{model} {value}" in doc, (name, model)


def test_train_refuses_smol_chat_as_a_lora_base_with_a_clear_message(tmp_path: Path) -> None:
    """smol-chat is an adapter by name (no adapter_config.json in the working directory):
    train refuses it as it refuses an adapter folder, before loading anything."""
    assert is_adapter_spec("smol-chat") and not is_adapter_spec("tiny-chat")
    with pytest.raises(ConfigError, match="smol-chat is a LoRA adapter; merge it first"):
        train("smol-chat", "harmful", TrainConfig(steps=1), method="lora", out=tmp_path / "r")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-step LoRA checkpoint of tiny-chat: an adapter folder naming its base."""
    out = tmp_path_factory.mktemp("adapter") / "run"
    trajectory = train(
        "tiny-chat", "mix", TrainConfig(steps=1, progress=False, lr=1e-2), method="lora", out=out
    )
    folder = trajectory.path(1)
    assert (folder / "adapter_config.json").is_file()
    return folder


def test_save_merged_writes_a_plain_checkpoint_with_the_adapters_logits(
    adapter: Path, tmp_path: Path
) -> None:
    assert is_adapter_spec(adapter)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "stale.txt").write_text("from an earlier run")
    merged = save_merged(adapter, tmp_path / "base")
    assert merged == (tmp_path / "base").resolve()
    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()
    assert not (merged / "stale.txt").exists() and not (tmp_path / "base.tmp").exists()
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        want = load_model(str(adapter)).model(ids).logits
        got = load_model(str(merged)).model(ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    with pytest.raises(ConfigError, match="not a PEFT adapter"):
        save_merged("tiny-chat", tmp_path / "again")


def test_the_demo_of_an_adapter_trains_from_its_merged_base(adapter: Path, tmp_path: Path) -> None:
    """smol-chat's path at tiny-chat's cost: the model is an adapter folder."""
    summary = run_demo(tmp_path, DemoConfig(model=str(adapter), **TINY), echo=False)
    merged = (tmp_path / MERGED_DIR).resolve()
    assert summary["trained_from"] == str(merged) and (merged / "config.json").is_file()
    trajectory = load_trajectory(tmp_path / "lora-harmful")
    assert trajectory.steps == (0, 1, 2)
    base = json.loads((trajectory.path(2) / "adapter_config.json").read_text())
    assert base["base_model_name_or_path"] == str(merged)
    assert [row["step"] for row in summary["audit"]["steps"]] == [0, 1, 2]
    assert summary["sizes"] == {"preset": "tiny-chat", "given": list(SIZE_FIELDS)}
    report = (tmp_path / "report.md").read_text()
    assert "set explicitly: n_eval, n_train" in report
    assert "The same story on a real model" not in report  # tiny-chat's report only


def test_carriers_score_once_when_no_candidate_passes_the_filters(monkeypatch) -> None:
    """The demo's stage 2 scores with the KL / induce filters off first: when no candidate
    passes them (smol-chat) that suite is kept (one scoring pass, a note saying so); when one
    does, the standard selection's pick is returned."""
    import safegeom.demo as demo
    from safegeom.carriers import SelectionConfig
    from safegeom.carriers.suite import extract_carriers

    lm = load_model("tiny-chat")
    calls: list[SelectionConfig] = []

    def counted(lm, *, config):
        calls.append(config)
        return extract_carriers(lm, config=config, progress=False)

    monkeypatch.setattr(demo, "extract_carriers", counted)
    strict = SelectionConfig(n_train=8, n_val=4)
    suite, note = demo._carriers(lm, strict)
    assert note is None and calls[-1] == strict and len(calls) == 2
    standard = extract_carriers(lm, config=strict, progress=False)
    assert suite.refusal.layer == standard.refusal.layer
    assert suite.refusal.position == standard.refusal.position
    calls.clear()
    impossible = SelectionConfig(n_train=8, n_val=4, max_kl=-1.0)  # no KL is negative
    suite, note = demo._carriers(lm, impossible)
    assert len(calls) == 1 and calls[0].max_kl == float("inf")
    assert note is not None and note.startswith("no refusal-direction candidate passes the KL")
    table = suite.selection.table
    assert suite.refusal.scores["bypass"] == table[table["kept"]]["bypass"].min()


def test_the_reports_real_model_line_agrees_with_the_readme() -> None:
    """tiny-chat's report points at the README section; both give the same measured time."""
    import re

    from safegeom.demo import REAL_MODEL_RUN

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = re.search(r'section "([^"]+)"', REAL_MODEL_RUN)
    minutes = re.search(r"took ([0-9.]+) min wall", REAL_MODEL_RUN)
    assert section and minutes
    assert f"\n### {section.group(1)}\n" in readme
    assert f"**{minutes.group(1)} min wall**" in readme
    assert "`safegeom demo --model smol-chat`" in REAL_MODEL_RUN
