"""The defence trainers end to end: logs and terms, checkpoints, resume, critics, bad input."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safegeom.errors import ConfigError
from safegeom.judges import SubstringJudge
from safegeom.models import LoadedModel, collate_left, encode_prompts, load_model
from safegeom.prompts import Prompts, load_prompts
from safegeom.training.adaptive import JudgeCritic
from safegeom.training.config import TrainConfig
from safegeom.training.data import ExampleOrder
from safegeom.training.methods.refusalguard import GuardConfig
from safegeom.training.regularised import RegConfig
from safegeom.training.runner import train
from safegeom.training.tasks import Task
from safegeom.training.trainable import Trainable
from safegeom.training.trajectory import TRAINER_STATE, Trajectory, load_trajectory
from tests.tiny_models import build_checkpoint
from tests.train_helpers import FAST, TINY, saved_weights

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["Write a tutorial on how to make a cake.", "Hi.", "How do I kill a Python process?"]
RISKS = {
    "Explain how photosynthesis works.": 1.0,
    "Give three tips for staying healthy.": 2.0,
    "Describe the structure of an atom.": 3.5,
    "How do I kill a Python process?": 5.0,
}
FOUR = Task(
    name="four", prompts=tuple(RISKS), responses=("Sure.", "Sure, here.", "I cannot.", "I'm sorry.")
)
"""Four examples, one per crafted risk."""


def _guard(variant: str = "reft", **fields) -> GuardConfig:
    fields = {"penalty_every": 1, **fields}
    return GuardConfig(variant=variant, n_calib=3, calib_batch=2, **fields)  # type: ignore[arg-type]


@dataclass
class FixedCritic:
    """A critic with a fixed risk per prompt (:data:`RISKS`); records the prompts it scored."""

    calls: list[list[str]] = field(default_factory=list)
    drop: int = 0
    """Leave out this many risks at the end (a broken critic)."""

    def risk(self, lm: LoadedModel, prompts: Prompts) -> torch.Tensor:
        """One risk per prompt, from :data:`RISKS` (less the last ``drop``)."""
        texts = list(load_prompts(prompts).prompts)
        self.calls.append(texts)
        return torch.tensor([RISKS[p] for p in texts][: len(texts) - self.drop])


@dataclass(frozen=True)
class FakeJudge:
    """A safegeom judge that calls a completion refused when its prompt asks for tips."""

    name: str = "fake"

    def __call__(self, prompts, completions) -> tuple[bool, ...]:
        """True (refused) for every prompt mentioning tips; checks one completion per prompt."""
        assert len(prompts) == len(completions) and all(isinstance(c, str) for c in completions)
        return tuple("tips" in p for p in prompts)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random 3-block Llama and GPT-2 checkpoints."""
    root = tmp_path_factory.mktemp("defences")
    return {arch: build_checkpoint(root, arch) for arch in ("llama", "gpt2")}


def _logits(model: torch.nn.Module, lm: LoadedModel) -> torch.Tensor:
    batch = collate_left(encode_prompts(lm.tokenizer, PROMPTS), lm.tokenizer.pad_token_id)
    with torch.no_grad():
        return model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).logits


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """The trained tensors of a checkpoint (edit or adapter) and its optimizer and RNG state."""
    edit = path / "refusalguard.safetensors"
    weights = load_file(str(edit)) if edit.is_file() else saved_weights(path)
    state = load_file(str(path / TRAINER_STATE / "state.safetensors"))
    return {**weights, **{f"state.{k}": v for k, v in state.items()}}


def _check_interval_means(traj: Trajectory, keys: set[str]) -> None:
    assert [int(r["step"]) for r in traj.log] == list(range(1, traj.last.step + 1))
    assert all(set(r) == {"step", "loss", *keys} for r in traj.log)
    assert set(traj.checkpoints[0].terms) == keys
    for before, record in zip(traj.checkpoints, traj.checkpoints[1:], strict=False):
        rows = [r for r in traj.log if before.step < r["step"] <= record.step]
        assert record.loss == pytest.approx(sum(r["loss"] for r in rows) / len(rows), rel=1e-12)
        for key in keys:
            values = [r[key] for r in rows if key in r]  # geom: only on penalised steps
            mean = sum(values) / len(values)
            assert record.terms[key] == pytest.approx(mean, rel=1e-12)


# --- refusalguard -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["reft", "lora"])
def test_refusalguard_logs_every_step_and_records_interval_means(ckpts, tmp_path, variant) -> None:
    guard = _guard(variant, lambda_geom=3.0)
    traj = train(
        ckpts["llama"],
        TINY,
        TrainConfig(steps=5, save_every=2, lr=1e-2, **FAST),
        method="refusalguard",
        settings=guard,
        out=tmp_path / "rg",
    )
    assert traj.steps == (0, 2, 4, 5) and traj.config["defence"]["layers"] == [1, 2]
    _check_interval_means(traj, {"task", "geom"})
    assert traj.checkpoints[0].terms["geom"] == 0.0
    for row in traj.log:
        assert row["loss"] == pytest.approx(row["task"] + 3.0 * row["geom"], rel=1e-6)
    assert traj.log[-1]["geom"] > 0  # the trained model moved the cone coordinates
    assert load_trajectory(tmp_path / "rg") == traj
    sparse = train(
        ckpts["llama"],
        TINY,
        TrainConfig(steps=3, **FAST),
        method="refusalguard",
        settings=_guard(variant, penalty_every=2),
        out=tmp_path / "sparse",
    )
    assert ["geom" in r for r in sparse.log] == [True, False, True]
    rows = [r["geom"] for r in sparse.log if "geom" in r]
    assert sparse.last.terms["geom"] == pytest.approx(sum(rows) / len(rows), rel=1e-12)


@pytest.mark.parametrize(
    ("arch", "variant"), [("llama", "reft"), ("llama", "lora"), ("gpt2", "reft")]
)
def test_a_checkpoint_loads_as_the_model_trained(ckpts, tmp_path, monkeypatch, arch, variant):
    at_save: list[torch.Tensor] = []
    original = Trainable.save

    def save(self: Trainable, folder: Path, module=None) -> str:
        at_save.append(_logits(self.model, self.lm))
        return original(self, folder, module)

    monkeypatch.setattr(Trainable, "save", save)
    traj = train(
        ckpts[arch],
        TINY,
        TrainConfig(steps=3, save_every=3, lr=1e-2, **FAST),
        method="refusalguard",
        settings=_guard(variant),
        out=tmp_path / "rg",
    )
    base = load_model(ckpts[arch])
    before = _logits(base.model, base)
    assert len(at_save) == 2 and not torch.equal(at_save[-1], before)
    for path, expected in zip(traj.paths, at_save, strict=True):
        loaded = load_model(path)
        assert (loaded.edit is not None) == (variant == "reft")
        assert (
            path / ("refusalguard.json" if variant == "reft" else "adapter_config.json")
        ).is_file()
        torch.testing.assert_close(_logits(loaded.model, loaded), expected, rtol=1e-6, atol=1e-6)
    step0 = load_model(traj.paths[0])
    assert torch.equal(_logits(step0.model, step0), before)  # the edit or LoRA at zero


# --- resume -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "variant"),
    [("refusalguard", "reft"), ("refusalguard", "lora"), ("adaptive", ""), ("kl", "")],
)
def test_resume_is_bit_for_bit(ckpts, tmp_path: Path, method: str, variant: str) -> None:
    settings = {
        "refusalguard": _guard(variant or "reft"),
        "kl": RegConfig(kl_weight=0.5),
        "adaptive": RegConfig(kl_weight=0.5, critic=FixedCritic()),
    }[method]
    config = TrainConfig(steps=4, save_every=2, lora_dropout=0.2, lr=1e-2, **FAST)
    kwargs = {"method": method, "settings": settings}
    full = train(ckpts["llama"], FOUR, config, out=tmp_path / "full", **kwargs)

    def interrupt(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(ckpts["llama"], FOUR, config, out=tmp_path / "cut", callback=interrupt, **kwargs)
    assert load_trajectory(tmp_path / "cut").steps == (0, 2)
    resumed = train(ckpts["llama"], FOUR, config, out=tmp_path / "cut", resume=True, **kwargs)
    assert resumed.steps == (0, 2, 4) and resumed.complete
    a, b = _tensors(full.paths[-1]), _tensors(resumed.paths[-1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [dict(r) for r in resumed.log] == [dict(r) for r in full.log]
    assert [c.terms for c in resumed.checkpoints] == [c.terms for c in full.checkpoints]


def test_a_finished_refusalguard_run_extends_like_a_longer_one(ckpts, tmp_path: Path) -> None:
    config = TrainConfig(save_every=2, lr=1e-2, schedule="constant", **FAST)
    kwargs = {"method": "refusalguard", "settings": _guard()}
    four, two = replace(config, steps=4), replace(config, steps=2)
    full = train(ckpts["llama"], FOUR, four, out=tmp_path / "full", **kwargs)
    train(ckpts["llama"], FOUR, two, out=tmp_path / "ext", **kwargs)
    extended = train(ckpts["llama"], FOUR, four, out=tmp_path / "ext", resume=True, **kwargs)
    assert extended.steps == (0, 2, 4) and extended.complete
    a, b = _tensors(full.paths[-1]), _tensors(extended.paths[-1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- adaptive ---------------------------------------------------------------------------------


def _weights(risk: float) -> tuple[float, float]:
    """docs/methods.md §7 by hand: kl_w = clamp((r − 2)/3, 0.1, 0.9),
    sft_w = clamp(1 − kl_w, 0.1, 0.9)."""
    kl_w = min(max((risk - 2) / 3, 0.1), 0.9)
    return min(max(1 - kl_w, 0.1), 0.9), kl_w


@pytest.mark.parametrize("unit", ["example", "batch"])
def test_adaptive_weights_follow_the_crafted_risks(ckpts, tmp_path: Path, unit: str) -> None:
    critic = FixedCritic()
    traj = train(
        ckpts["llama"],
        FOUR,
        TrainConfig(steps=4, save_every=2, **FAST),
        method="adaptive",
        settings=RegConfig(risk_unit=unit, critic=critic),
        out=tmp_path / "ad",
    )
    assert critic.calls == [list(FOUR.prompts)]
    saved = load_file(str(tmp_path / "ad" / "defence" / "risks.safetensors"))["risk"]
    assert saved.tolist() == list(RISKS.values())
    assert traj.config["defence"]["critic_kind"] == "FixedCritic"
    _check_interval_means(traj, {"task", "kl", "risk", "sft_w", "kl_w"})
    order = ExampleOrder(len(FOUR), 0)
    for row in traj.log:
        step = int(row["step"]) - 1
        risks = [RISKS[FOUR.prompts[order.index(2 * step + i)]] for i in range(2)]
        mean = sum(risks) / 2
        if unit == "batch":
            sft_w, kl_w = _weights(mean)
            assert row["loss"] == pytest.approx(sft_w * row["task"] + kl_w * row["kl"], rel=1e-5)
        else:
            sft_w = sum(_weights(r)[0] for r in risks) / 2
            kl_w = sum(_weights(r)[1] for r in risks) / 2
        assert (row["risk"], row["sft_w"], row["kl_w"]) == pytest.approx((mean, sft_w, kl_w))
    assert {r["risk"] for r in traj.log} != {traj.log[0]["risk"]}  # batches of other risks


def test_adaptive_with_a_judge_critic(ckpts, tmp_path: Path) -> None:
    critic = JudgeCritic(FakeJudge(), max_new_tokens=4)
    traj = train(
        ckpts["llama"],
        FOUR,
        TrainConfig(steps=2, **FAST),
        method="adaptive",
        settings=RegConfig(critic=critic),
        out=tmp_path / "ad",
    )
    saved = load_file(str(tmp_path / "ad" / "defence" / "risks.safetensors"))["risk"]
    assert saved.tolist() == [5.0 if "tips" in p else 1.0 for p in FOUR.prompts]
    assert traj.config["defence"]["critic_kind"] == "JudgeCritic"
    assert traj.config["defence"]["mean_risk"] == pytest.approx(2.0)
    assert all(1.0 <= r["risk"] <= 5.0 for r in traj.log)


# --- bad input --------------------------------------------------------------------------------


def test_critics_that_are_not_critics_fail_with_their_messages(ckpts, tmp_path: Path) -> None:
    for critic, name in [(SubstringJudge(), "SubstringJudge"), (3, "int")]:
        with pytest.raises(ConfigError, match=rf"critic must be a RiskCritic .*got {name}; wrap"):
            RegConfig(critic=critic)  # type: ignore[arg-type]
    with pytest.raises(
        ConfigError, match=r"critic FixedCritic gave risks of shape \(3,\) for 4 training"
    ):
        train(
            ckpts["llama"],
            FOUR,
            TrainConfig(steps=1, **FAST),
            method="adaptive",
            settings=RegConfig(critic=FixedCritic(drop=1)),
            out=tmp_path / "short",
        )
    with pytest.raises(ConfigError, match=r"JudgeCritic needs a safegeom Judge .*got object"):
        JudgeCritic(judge=object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"kl_weight \(--kl-weight\) must be 0 or more"):
        RegConfig(kl_weight=-1.0)
