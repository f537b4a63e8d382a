"""``safegeom evaluate`` options: flags named in messages, --out checked first, interventions
recorded by value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from safegeom.carriers import Carrier
from safegeom.cli import main
from safegeom.errors import ConfigError
from safegeom.eval_result import EvalResult
from safegeom.evaluation import EvaluateConfig
from safegeom.models import LoadConfig, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("eval-cli")
    prompts = root / "p.json"
    prompts.write_text(json.dumps(["Hack a bank.", "Write a poem."]))
    lm = load_model(checkpoints["llama"], LoadConfig(device="cpu"))
    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
    carrier = Carrier(vectors=v, kind="refusal", method="dim", layer=1, position="t_post[-1]")
    carrier.save(root / "refusal.safetensors")
    return [
        str(checkpoints["llama"]),
        "--prompts",
        str(prompts),
        "--no-progress",
        "--max-new-tokens",
        "2",
        "--device",
        "cpu",
        "--carrier",
        str(root / "refusal.safetensors"),
    ]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--intervene", "add", "--limit", "0"], "--limit must be at least 1, got 0"),
        (["--intervene", "add", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        ([], "--carrier and --intervene go together"),
    ],
)
def test_bad_flags_exit_2_with_one_line(
    base: list[str], capsys: pytest.CaptureFixture, flags: list[str], message: str
) -> None:
    assert main(["evaluate", *base, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_out_checked_before_the_model_loads(
    base: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["evaluate", *base, "--intervene", "ablate", "--out", str(tmp_path)]) == 2
    assert "is a folder; give a file path" in capsys.readouterr().err


def test_intervention_recorded_by_value(
    base: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "r.json"
    flags = [
        "--intervene",
        "add",
        "--coeff",
        "-1.5",
        "--add-positions",
        "prompt",
        "--out",
        str(out),
    ]
    assert main(["evaluate", *base, *flags]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    described = EvalResult.load(out).provenance["intervention"]
    assert (described["kind"], described["coefficient"], described["layers"]) == (
        "addition",
        -1.5,
        1,
    )
    assert described["positions"] == "prompt" and described["carrier"]["method"] == "dim"


def test_evaluate_config_checks() -> None:
    with pytest.raises(ConfigError, match="--max-new-tokens must be at least 1, got 0"):
        EvaluateConfig(max_new_tokens=0)
    assert EvaluateConfig().score is True
