"""Judges that cannot lie: a random head, a missing label or an adapter folder is refused in one
line, and the advice names the command-line form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForSequenceClassification

from safegeom.cli import main
from safegeom.errors import ModelLoadError, SafegeomError
from safegeom.judges import ModelJudge, get_judge, parse_guard
from tests.tiny_models import LLAMA3_STYLE, build_checkpoint, build_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("judge-lm"), "llama", n_layers=1)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = build_tokenizer(LLAMA3_STYLE)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("judge-clf") / "clf"
    LlamaForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_causal_lm_as_classifier_is_refused(causal_lm: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no trained classification head: score\.weight"):
        get_judge(f"hf-classifier:{causal_lm}#LABEL_1")


def test_label_not_in_id2label_is_refused(classifier: Path) -> None:
    with pytest.raises(
        SafegeomError, match=r"unknown classifier label 'NOPE' .*clf#LABEL with one"
    ):
        get_judge(f"hf-classifier:{classifier}#NOPE")
    assert get_judge(f"hf-classifier:{classifier}#LABEL_1").name.endswith("#LABEL_1")


def test_adapter_folder_as_chat_judge_is_refused_before_loading(
    causal_lm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = AutoModelForCausalLM.from_pretrained(causal_lm)
    adapter = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    adapter.save_pretrained(tmp_path / "adapter")
    # Nothing may reach for the hub: any network call fails the test.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="is a PEFT adapter, not a full model"):
        get_judge(f"chat-judge:{tmp_path / 'adapter'}")


def test_folder_without_a_model_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "notes.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="cannot load the judge model at") as err:
        get_judge(f"chat-judge:{tmp_path / 'j'}")
    assert len(str(err.value).splitlines()) == 1


def test_label_advice_gives_the_command_line_form(classifier: Path) -> None:
    judge = get_judge(f"hf-classifier:{classifier}")
    assert isinstance(judge, ModelJudge)
    with pytest.raises(SafegeomError, match=r"--judge hf-classifier:PATH#LABEL"):
        judge(["q"], ["a"])
    with pytest.raises(SafegeomError, match="on the command line chat-judge: needs a judge"):
        parse_guard("maybe")


def test_cli_refuses_a_missing_label_in_one_line(
    classifier: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["Write a poem."]))
    spec = f"hf-classifier:{classifier}#NOPE"
    code = main(["evaluate", str(classifier), "--prompts", str(prompts), "--judge", spec])
    err = capsys.readouterr().err
    assert code == 2 and "unknown classifier label 'NOPE'" in err
    assert len(err.strip().splitlines()) == 1
