"""The defence study's per-model presets and held-out sizes (``analyses/defences_settings.py``,
``analyses/defences_eval.py``, ``analyses/defences_report.py``): issue 22's smol-chat study and its
erosion targets. Prompt sets are read; no model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from analyses.defences import output_paths
from analyses.defences_eval import EvalSizes, harmful_sets, harmless_sets
from analyses.defences_report import NO_UNALIGNED, erosion_targets, notes
from analyses.defences_settings import NEEDS_UNALIGNED, PRESETS, Settings, spec, train_kwargs


def test_default_sizes_are_the_whole_splits_of_the_tiny_chat_study() -> None:
    parts = harmful_sets(EvalSizes())
    assert [len(p) for p in parts] == [104, 20, 80]
    (alpaca, judge_a), (xstest, judge_x) = harmless_sets(EvalSizes())
    assert (len(alpaca), judge_a, len(xstest), judge_x) == (100, "substring", 50, "xstest")


def test_a_smaller_size_is_a_fixed_sample_of_each_split_capped_at_its_length() -> None:
    sizes = EvalSizes(n_harmful=40, n_alpaca=50)
    parts = harmful_sets(sizes)
    assert [len(p) for p in parts] == [40, 20, 40]  # jbb-harmful:test has only 20
    again = harmful_sets(EvalSizes(n_harmful=40, n_alpaca=50))
    assert [list(p.prompts) for p in parts] == [list(p.prompts) for p in again]
    whole = set(harmful_sets(EvalSizes())[0].prompts)
    assert set(parts[0].prompts) <= whole and len(set(parts[0].prompts)) == 40
    assert len(harmless_sets(sizes)[0][0]) == 50


def test_every_preset_has_a_grid_per_method_and_an_unaligned_base_where_needed() -> None:
    for model, preset in PRESETS.items():
        assert preset.settings.model == model
        assert set(preset.methods) <= set(preset.grids), model
        if preset.settings.unaligned_base is None:
            assert not set(preset.methods) & set(NEEDS_UNALIGNED), model
        for task, methods in preset.task_methods.items():
            assert task in preset.tasks and set(methods) <= set(preset.methods)
    smol = PRESETS["smol-chat"]
    assert {"safe-lora", "lox", "rg-lora", "rg-reft"} <= set(smol.methods)
    assert smol.settings.unaligned_base == "smollm2-135m-instruct"


def test_safe_lora_and_lox_read_the_unaligned_base_and_refuse_without_one() -> None:
    smol = PRESETS["smol-chat"].settings
    for method in NEEDS_UNALIGNED:
        kwargs = train_kwargs(spec(method, "mix", 0, 2e-3), smol)
        assert kwargs["method"] == method
        assert kwargs["settings"].unaligned_base == "smollm2-135m-instruct"
        with pytest.raises(ValueError, match=f"{method} needs the unaligned base; tiny-chat"):
            train_kwargs(spec(method, "mix", 0, 2e-3), Settings())
    assert train_kwargs(spec("rg-lora", "mix", 0, 2e-3), smol)["settings"].lambda_geom == 0.3


def test_output_paths_keep_tiny_chats_names_and_name_other_models() -> None:
    work, json_path, md_path = output_paths("tiny-chat")
    assert json_path == Path("analyses/results/defences.json") and md_path.suffix == ".md"
    work_s, json_s, _ = output_paths("smol-chat")
    assert json_s.name == "defences_smol-chat.json" and work_s != work


def test_notes_say_the_sizes_and_what_is_left_out() -> None:
    tiny, smol = notes(PRESETS["tiny-chat"].settings), notes(PRESETS["smol-chat"].settings)
    assert tiny[0] == NO_UNALIGNED and "(204)" in tiny[1] and "sample (100" in tiny[1]
    assert NO_UNALIGNED not in smol
    assert "(100, a sample of 40 per set (seed 0))" in smol[0]
    assert "first 100 of the 200" in smol[0] and "the 50 Alpaca prompts" in smol[0]


def _row(step: int, asr: float, low: float, high: float) -> dict:
    return {"step": step, "asr": asr, "asr_ci": [low, high]}


def test_erosion_targets_measure_the_largest_rise_against_the_base() -> None:
    trajectories = {
        "lora": {
            "harmful": [_row(0, 0.05, 0.0, 0.1), _row(25, 0.7, 0.6, 0.8), _row(50, 0.5, 0.4, 0.6)],
            "sentiment": [
                _row(0, 0.05, 0.0, 0.1),
                _row(25, 0.08, 0.03, 0.13),
                _row(50, 0.2, 0.1, 0.3),
            ],
        }
    }
    got = {
        t["target"].split(":")[0]: (round(t["value"], 6), t["met"])
        for t in erosion_targets(trajectories)
    }
    assert got == {"harmful (seed 0)": (65.0, True), "sentiment (seed 0)": (15.0, True)}
    names = [t["target"] for t in erosion_targets(trajectories)]
    assert "by step 50" in names[0]


def test_erosion_targets_missed_and_left_out() -> None:
    weak = {
        "lora": {
            "harmful": [_row(0, 0.05, 0.0, 0.1), _row(50, 0.4, 0.3, 0.5)],
            "sentiment": [_row(0, 0.05, 0.0, 0.1), _row(50, 0.1, 0.04, 0.16)],  # CI holds the base
        }
    }
    got = [(round(t["value"], 6), t["met"]) for t in erosion_targets(weak)]
    assert got == [(35.0, False), (0.0, False)]
    assert erosion_targets({"rg-lora": weak["lora"]}) == []
    assert erosion_targets({"lora": {"harmful": weak["lora"]["harmful"][:1]}}) == []


def test_base_model_keeps_tiny_chat_and_reuses_a_merged_folder(tmp_path: Path) -> None:
    from analyses.study_base import base_model

    assert base_model("tiny-chat", tmp_path) == "tiny-chat"
    assert not (tmp_path / "base").exists()  # nothing merged for a full model
    (tmp_path / "base").mkdir()  # a folder there is complete (written beside, renamed)
    assert base_model("smol-chat", tmp_path) == str(tmp_path / "base")
