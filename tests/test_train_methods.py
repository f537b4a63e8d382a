"""A method of one's own: registered in a test, it trains, resumes bit for bit, audits and shows
up on the command line (its choice, help line, option group and flag checks)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from safegeom.audit import audit
from safegeom.cli import build_parser, main
from safegeom.cli.train import check_method_flags, method_groups
from safegeom.config import check
from safegeom.errors import ConfigError
from safegeom.training import TrainConfig, Trajectory
from safegeom.training.methods import METHODS, Method, Prepared, Setup, StepInputs, task_loss
from safegeom.training.methods.base import Terms, fixed
from safegeom.training.regularised import RegConfig
from safegeom.training.runner import train
from tests.audit_fakes import FAKE_CONFIG, install
from tests.tiny_models import build_checkpoint
from tests.train_helpers import FAST, saved_weights

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class ToyConfig:
    """Settings of the toy method."""

    toy_weight: float = 0.5
    """Weight of the trained parameters' squared norm in the loss."""

    def __post_init__(self) -> None:
        """Refuse a negative weight."""
        check(self.toy_weight >= 0, "toy_weight", "must be 0 or more", self.toy_weight)


class ToyState(Prepared):
    """LoRA whose loss adds the adapters' squared norm (term ``norm``)."""

    def __init__(self, weight: float, record: dict[str, Any]) -> None:
        super().__init__("lora", record)
        self.weight = weight

    def loss(self, inputs: StepInputs) -> tuple[Tensor, Terms]:
        loss, terms = task_loss(inputs)
        norm = sum((p.float() ** 2).sum() for p in inputs.trainable.parameters())
        assert isinstance(norm, Tensor)
        terms["norm"] = norm.detach() / inputs.world
        return loss + self.weight * norm / inputs.world, terms


def _prepare(setup: Setup, settings: ToyConfig) -> ToyState:
    """Record the frozen model's depth; write the number of training prompts (read on resume)."""
    path = setup.folder / "toy.json"
    if setup.resume:
        assert json.loads(path.read_text()) == {"prompts": len(setup.prompts)}
    elif setup.write:
        setup.folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"prompts": len(setup.prompts)}))
    record = {
        "method": setup.method,
        "toy_weight": settings.toy_weight,
        "layers": setup.lm.n_layers,
    }
    return ToyState(settings.toy_weight, record)


TOY = Method(
    summary="LoRA with the adapters' squared norm added to the loss (--toy-weight)",
    update=fixed("lora"),
    prepare=_prepare,
    config=ToyConfig,
    group="toy method",
)
RUN = TrainConfig(steps=4, save_every=2, lr=0.05, **FAST)
"""Four steps of two examples, checkpoints at steps 0, 2 and 4."""
TASK = "arith:4"
"""A task the audit can rebuild from the run's manifest (its default task)."""


@pytest.fixture(autouse=True)
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The toy method registered as ``toy`` for the test (the registry is restored after)."""
    monkeypatch.setitem(METHODS, "toy", TOY)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a chat template."""
    return build_checkpoint(tmp_path_factory.mktemp("toy"), "llama")


@pytest.fixture(scope="module")
def full(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Trajectory:
    """An uninterrupted toy run of four steps (checkpoints at 0, 2 and 4)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(METHODS, "toy", TOY)
        out = tmp_path_factory.mktemp("toy_run") / "run"
        return train(ckpt, TASK, RUN, method="toy", settings=ToyConfig(toy_weight=0.5), out=out)


def test_the_toy_method_trains_with_its_loss_terms_and_record(
    ckpt: Path, full: Trajectory, tmp_path: Path
) -> None:
    assert full.steps == (0, 2, 4) and full.complete
    assert full.config["method"] == "toy"
    assert full.config["defence"] == {"method": "toy", "toy_weight": 0.5, "layers": 3}
    assert full.config["lora_r"] == 8 and full.config["lr"] == 0.05  # a LoRA run's settings
    assert json.loads((full.root / "defence" / "toy.json").read_text()) == {"prompts": 4}
    assert [row["step"] for row in full.log] == [1, 2, 3, 4]
    for row in full.log:  # the loss is the method's: task + weight · norm
        assert row["norm"] > 0
        assert math.isclose(row["loss"], row["task"] + 0.5 * row["norm"], rel_tol=1e-6)
    assert set(full.checkpoints[-1].terms) == {"task", "norm"}
    lora = train(ckpt, TASK, RUN, method="lora", out=tmp_path / "lora")
    assert "norm" not in lora.checkpoints[-1].terms
    ours, plain = saved_weights(full.paths[-1]), saved_weights(lora.paths[-1])
    assert ours.keys() == plain.keys()
    assert any(not torch.equal(ours[k], plain[k]) for k in ours)  # the norm term pulls
    norms = [float(sum((t.float() ** 2).sum() for t in d.values())) for d in (ours, plain)]
    assert norms[0] < norms[1]


def test_the_toy_method_resumes_equal_to_an_uninterrupted_run(
    ckpt: Path, full: Trajectory, tmp_path: Path
) -> None:
    def stop(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    out, half = tmp_path / "cut", ToyConfig(toy_weight=0.5)
    with pytest.raises(KeyboardInterrupt):
        train(ckpt, TASK, RUN, method="toy", settings=half, out=out, callback=stop)
    resumed = train(ckpt, TASK, RUN, method="toy", settings=half, out=out, resume=True)
    assert resumed.steps == full.steps and resumed.log == full.log
    assert resumed.config == full.config
    for a, b in zip(full.paths, resumed.paths, strict=True):
        first, second = saved_weights(a), saved_weights(b)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first)
    changed = r"cannot resume .*'toy_weight': 0\.5.* \(run\) vs .*'toy_weight': 1\.0"
    with pytest.raises(ConfigError, match=changed):
        train(
            ckpt, TASK, RUN, method="toy", settings=ToyConfig(toy_weight=1.0), out=out, resume=True
        )


def test_the_toy_methods_trajectory_audits(
    full: Trajectory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = install(monkeypatch)
    result = audit(full.root, tmp_path / "audit", progress=False, **FAKE_CONFIG)
    assert result.checkpoints == ("base", "step-000002", "step-000004")
    assert [c["form"] for c in result.manifest["checkpoints"]] == ["full", "adapter", "adapter"]
    assert len(calls.measured) == 3
    values = result.table[result.table["metric"] == "cosine_to_base"].groupby("step")["value"]
    assert len(set(values.sum().round(9))) == 3  # three different checkpoints measured


def test_the_command_line_derives_the_toy_method(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "\n  toy " in text and "adapters' squared norm" in text
    assert "toy method (toy only):" in text and "--toy-weight" in text
    groups = {g.cls: g for g in method_groups()}
    assert groups[ToyConfig].methods == ("toy",)
    parser = build_parser()
    args = parser.parse_args(
        ["train", "lora", "m", "--task", "t", "--out", "o", "--toy-weight", "2"]
    )
    with pytest.raises(ConfigError, match="--toy-weight is for toy; got method lora"):
        check_method_flags("lora", args)
    toy = parser.parse_args(["train", "toy", "m", "--task", "t", "--out", "o", "--toy-weight", "2"])
    check_method_flags("toy", toy)  # its own flag is fine


def test_method_keywords_are_checked_against_the_method(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="settings= takes a ToyConfig for toy, got RegConfig"):
        train(ckpt, TASK, RUN, method="toy", settings=RegConfig(), out=tmp_path / "b")
    with pytest.raises(ConfigError, match=r"unknown method 'nope'; use one of sft, lora, .*toy"):
        train(ckpt, TASK, RUN, method="nope", out=tmp_path / "c")
    with pytest.raises(ConfigError, match=r"toy_weight \(--toy-weight\) must be 0 or more"):
        ToyConfig(toy_weight=-1.0)
    assert not any((tmp_path / name).exists() for name in "bc")  # refused before any work
