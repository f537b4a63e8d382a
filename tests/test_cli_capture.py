"""End-to-end: ``safegeom capture`` on a tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from safegeom.activations.values import ActivationStats, load_activations
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


def test_capture_cli_stats_is_one_file_with_a_readable_line(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "stats.safetensors"
    argv = ["capture", str(checkpoints["llama"]), "--prompts", "advbench:val", "--limit", "5"]
    assert main([*argv, "--stats", "--layers", "1", "--no-progress", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {out} (float64 means of resid_pre; layers 1;")
    assert "n=5" in line and line.endswith(f"and {out}.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, f"{out.name}.json"]
    stats = ActivationStats.load(out)
    assert stats.layers == (1,) and stats.n == 5 and stats.provenance["n_prompts"] == 5
    assert stats.provenance.prompt_sets.keys() == {"advbench:val"}
    assert stats.provenance.config["stats"] is True and stats.moments["resid_pre"].cov is None


def test_capture_cli_backend_reaches_disk_capture(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    pytest.importorskip("transformer_lens")
    argv = ["capture", str(checkpoints["llama"]), "--prompts", "advbench:val", "--limit", "3"]
    folder = tmp_path / "sh"
    code = main([*argv, "--backend", "transformer_lens", "--shard-size", "2", "--out", str(folder)])
    assert code == 0
    assert load_activations(folder).provenance["backend"] == "transformer_lens"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--covariance"], "covariance (--covariance) needs --stats"),
        (["--shard-size", "0"], "shard_size (--shard-size) must be a positive number of prompts"),
        (["--shard-size", "-2"], "shard_size (--shard-size) must be a positive number of prompts"),
        (["--shard-size", "4", "--stats"], "cannot be combined with --stats"),
        (["--storage-dtype", "int8"], "dtype (--storage-dtype) must be a floating-point"),
        (["--limit", "0"], "limit (--limit) must be a positive number of prompts"),
        (["--batch-size", "0"], "batch_size (--batch-size) must be at least 1"),
    ],
)
def test_capture_cli_bad_options_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    # The model does not exist: these errors come before anything is loaded.
    argv = ["capture", str(tmp_path / "no-model"), "--prompts", "advbench", *extra]
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("safegeom capture: error:") and message in err


@pytest.mark.parametrize(("shards", "message"), [(False, "is a folder"), (True, "is a file")])
def test_capture_cli_checks_out_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], shards: bool, message: str
) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    out = tmp_path / ("file" if shards else "folder")
    extra = ["--shard-size", "4"] if shards else []
    argv = ["capture", str(tmp_path / "no-model"), "--prompts", "advbench", *extra]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("safegeom capture: error: --out") and message in err
