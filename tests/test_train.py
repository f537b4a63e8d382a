"""Fine-tuning runners: labels, tasks, trajectories, determinism, resume, bad input, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from safegeom.cli import main
from safegeom.models import LoadConfig, encode_prompts, load_model
from safegeom.training.config import TrainConfig
from safegeom.training.data import IGNORE_INDEX, collate_right, encode_examples
from safegeom.training.runner import default_lora_targets, train
from safegeom.training.tasks import Task, exact_match, extract_answer, get_task
from safegeom.training.trajectory import load_trajectory
from tests.tiny_models import (
    GEMMA_STYLE,
    LLAMA3_STYLE,
    SUFFIX_STYLE,
    build_checkpoint,
    build_tokenizer,
)
from tests.train_helpers import FAST, TINY, saved_weights


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint with a chat template."""
    return build_checkpoint(tmp_path_factory.mktemp("train"), "llama", n_layers=2)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- data -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "completion"),
    [
        (LLAMA3_STYLE, "Sure, here is a poem.<|eot|>"),  # trailing template text is dropped
        (SUFFIX_STYLE, " Sure, here is a poem.<|eot|>"),  # template text before the response kept
        (GEMMA_STYLE, "Sure, here is a poem.<|eot|>"),  # trimmed content
    ],
)
def test_response_only_labels(template: str, completion: str) -> None:
    tok = build_tokenizer(template)
    prompt, response = "Explain how atoms work.", "Sure, here is a poem."
    (ex,) = encode_examples(tok, [prompt], [response])
    (enc,) = encode_prompts(tok, [prompt])
    assert ex.input_ids[: ex.n_prompt] == enc.input_ids  # prompt = generation-prompt rendering
    assert ex.labels[: ex.n_prompt] == (IGNORE_INDEX,) * ex.n_prompt
    assert ex.labels[ex.n_prompt :] == ex.input_ids[ex.n_prompt :]
    assert tok.decode(ex.input_ids[ex.n_prompt :]) == completion
    batch = collate_right([ex, *encode_examples(tok, ["Hi"], ["Ok"])], tok.pad_token_id)
    assert batch.labels.shape == batch.input_ids.shape
    assert batch.n_target_tokens == len(ex) - ex.n_prompt + batch.labels[1].ne(-100).sum()
    assert batch.attention_mask[1].sum() < batch.attention_mask[0].sum()  # right padding
    assert batch.labels[1, -1] == IGNORE_INDEX


def test_eos_appended_without_end_token_and_mismatch_raises() -> None:
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok = build_tokenizer(plain + "{% if add_generation_prompt %}assistant:{% endif %}")
    (ex,) = encode_examples(tok, ["Hello there"], ["Sure"])
    assert ex.input_ids[-1] == tok.eos_token_id
    odd = build_tokenizer(plain + "{% if add_generation_prompt %}model:{% endif %}")
    with pytest.raises(ValueError, match="different prefix than the generation prompt"):
        encode_examples(odd, ["Hello there"], ["Sure"])


# --- tasks ------------------------------------------------------------------------------------


def test_task_sizes_and_splits() -> None:
    harmful = get_task("harmful")
    assert len(harmful) == 100 and harmful.eval_prompts is None
    assert all(r.startswith("Sure, here") for r in harmful.responses)
    assert get_task("harmful") == harmful and len(get_task("harmful:372")) == 372
    arith = get_task("arith")
    assert len(arith) == 1000 and len(arith.eval_prompts or ()) == 200
    assert not set(arith.eval_prompts or ()) & set(get_task("arith:1400").prompts)
    mix = get_task("mix")
    assert len(mix) == 500 and sum(r.startswith("Sure") for r in mix.responses) == 100
    assert extract_answer("3 + 4 = 7") == "7" and extract_answer("none") is None
    assert exact_match(["12 + 3 = 15", "it is 9", "x"], ["15", "8", "1"]) == pytest.approx(1 / 3)


def test_default_lora_targets(tmp_path: Path) -> None:
    llama = load_model(build_checkpoint(tmp_path, "llama", n_layers=1))
    assert default_lora_targets(llama) == tuple(
        f"{n}_proj" for n in ("q", "k", "v", "o", "gate", "up", "down")
    )
    assert set(
        default_lora_targets(load_model(build_checkpoint(tmp_path, "gpt2", n_layers=1)))
    ) == {
        "c_attn",
        "c_proj",
        "c_fc",
    }


# --- trajectories -----------------------------------------------------------------------------


def test_lora_trajectory_loads_and_merges(ckpt: Path, tmp_path: Path) -> None:
    traj = train(
        ckpt, TINY, TrainConfig(steps=4, save_every=2, **FAST), method="lora", out=tmp_path / "run"
    )
    assert traj.steps == (0, 2, 4) and traj.complete
    read = load_trajectory(tmp_path / "run")
    assert read == traj and read.config["method"] == "lora" and read.config["task_size"] == 2
    assert read.base_model == str(ckpt.resolve()) and read.base_hash == load_model(ckpt).weight_hash
    assert all(isinstance(loss, float) for loss in read.losses)
    ids = torch.tensor([[1, 3, 90, 88, 74, 87, 4, 204]])
    for path in read.paths:
        config = json.loads((path / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(ckpt.resolve())
        adapter, merged = load_model(path), load_model(path, LoadConfig(merge_adapter=True))
        with torch.no_grad():
            torch.testing.assert_close(adapter.model(ids).logits, merged.model(ids).logits)
    assert not _same(saved_weights(read.paths[0]), saved_weights(read.paths[-1]))


def test_sft_trajectory_and_determinism(ckpt: Path, tmp_path: Path) -> None:
    a = train(
        ckpt, TINY, TrainConfig(steps=3, save_every=2, **FAST), method="sft", out=tmp_path / "a"
    )
    assert a.steps == (0, 2, 3)
    for record, path in zip(a.checkpoints, a.paths, strict=True):
        assert load_model(path).weight_hash == record.weight_hash
    assert a.checkpoints[0].weight_hash == a.base_hash
    b = train(
        ckpt, TINY, TrainConfig(steps=3, save_every=2, **FAST), method="sft", out=tmp_path / "b"
    )
    assert _same(saved_weights(a.paths[-1]), saved_weights(b.paths[-1]))
    c = train(
        ckpt,
        TINY,
        TrainConfig(steps=2, save_every=2, seed=1, **FAST),
        method="lora",
        out=tmp_path / "c",
    )
    d = train(
        ckpt,
        TINY,
        TrainConfig(steps=2, save_every=2, seed=2, **FAST),
        method="lora",
        out=tmp_path / "d",
    )
    assert not _same(saved_weights(c.paths[-1]), saved_weights(d.paths[-1]))


@pytest.mark.parametrize("method", ["lora", "sft"])
def test_resume_equals_uninterrupted(ckpt: Path, tmp_path: Path, method: str) -> None:
    config = TrainConfig(steps=6, save_every=2, lora_dropout=0.2, **FAST)
    full = train(ckpt, "harmful:10", config, method=method, out=tmp_path / "full")

    def interrupt(step: int, loss: float) -> None:
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(ckpt, "harmful:10", config, method=method, out=tmp_path / "cut", callback=interrupt)
    cut = load_trajectory(tmp_path / "cut")
    assert cut.steps == (0, 2, 4) and not cut.complete
    resumed = train(ckpt, "harmful:10", config, method=method, out=tmp_path / "cut", resume=True)
    assert resumed.steps == (0, 2, 4, 6) and resumed.complete
    assert _same(saved_weights(full.paths[-1]), saved_weights(resumed.paths[-1]))
    assert resumed.losses == pytest.approx(full.losses)


def test_loss_decreases_on_overfit_task(ckpt: Path, tmp_path: Path) -> None:
    traj = train(
        ckpt,
        TINY,
        TrainConfig(steps=30, save_every=10, lr=3e-3, schedule="constant", **FAST),
        method="sft",
        out=tmp_path / "o",
    )
    first, last = traj.losses[0], traj.losses[-1]
    assert first is not None and last is not None and last < 0.3 * first


# --- bad input --------------------------------------------------------------------------------


def test_bad_inputs(ckpt: Path, tmp_path: Path) -> None:
    file = tmp_path / "t.jsonl"
    file.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:2: missing field 'response'"):
        get_task(file)
    file.write_text('{"q": "a", "a": "b"}\n')
    assert len(get_task(file, prompt_field="q", response_field="a")) == 1
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        get_task(empty)
    with pytest.raises(ValueError, match="is empty"):
        Task(name="none", prompts=(), responses=())
    with pytest.raises(ValueError, match="unknown task 'cooking'"):
        get_task("cooking")
    train(
        ckpt, TINY, TrainConfig(steps=1, save_every=1, **FAST), method="lora", out=tmp_path / "run"
    )
    with pytest.raises(ValueError, match="already holds a training run; pass --resume"):
        train(
            ckpt,
            TINY,
            TrainConfig(steps=1, save_every=1, **FAST),
            method="lora",
            out=tmp_path / "run",
        )
    with pytest.raises(ValueError, match=r"different settings: lr 0.001 \(run\) vs 0.01 \(now\)"):
        train(
            ckpt,
            TINY,
            TrainConfig(steps=1, save_every=1, lr=0.01, **FAST),
            method="lora",
            out=tmp_path / "run",
            resume=True,
        )
    again = train(
        ckpt,
        TINY,
        TrainConfig(steps=1, save_every=1, **FAST),
        method="sft",
        out=tmp_path / "run",
        overwrite=True,
    )
    assert again.method == "sft"


# --- command line -----------------------------------------------------------------------------


def test_cli_end_to_end(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "task.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": p, "response": r}) + "\n"
            for p, r in zip(TINY.prompts, TINY.responses, strict=True)
        )
    )
    out = tmp_path / "cli"
    args = [
        "train",
        "lora",
        str(ckpt),
        "--task",
        str(data),
        "--out",
        str(out),
        "--steps",
        "2",
        "--save-every",
        "1",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    assert main([*args, "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert [c["step"] for c in manifest["checkpoints"]] == [0, 1, 2]
    assert manifest["config"]["task"] == str(data)
    assert main(args) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert main([*args[:3], "--task", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
