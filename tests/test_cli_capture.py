"""End-to-end: ``safegeom capture`` on a tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from safegeom.activations import ActivationStats, load_activations
from safegeom.cli import main


def test_capture_cli_writes_readable_files(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "acts.safetensors"
    argv = ["capture", str(checkpoints["llama"]), "--prompts", "advbench:val", "--limit", "6"]
    code = main(
        [*argv, "--layers", "0,-1", "--positions", "t_inst,t_post", "--out", str(out), "--json"]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    acts = load_activations(out)
    assert acts.layers == (0, 2) and list(acts["resid_pre"].shape) == summary["shape"]["resid_pre"]
    assert list(acts.provenance.prompt_sets) == ["advbench:val"]
    assert acts.provenance["n_prompts"] == 6

    assert main([*argv, "--stats", "--covariance", "--out", str(tmp_path / "m"), "--json"]) == 0
    path = json.loads(capsys.readouterr().out)["out"]
    moments = ActivationStats.load(path).moments["resid_pre"]
    full_mean = acts["resid_pre"][:, :, 1:].double().mean(0)  # drop t_inst
    torch.testing.assert_close(moments.mean[[0, 2]], full_mean, atol=1e-6, rtol=0)
    assert moments.n == 6 and moments.cov is not None

    assert main([*argv, "--shard-size", "4", "--out", str(tmp_path / "sh")]) == 0
    assert load_activations(tmp_path / "sh")["resid_pre"].shape[0] == 6


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompts", "nosuchset"], "unknown prompt set 'nosuchset'"),
        (["--prompts", "advbench", "--layers", "9"], "layer 9 out of range"),
        (["--prompts", "advbench", "--sites", "resid_mid"], "unknown site"),
    ],
)
def test_capture_cli_bad_input(
    checkpoints: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    code = main(["capture", str(checkpoints["gpt2"]), *extra, "--out", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("safegeom capture: error:") and message in err
