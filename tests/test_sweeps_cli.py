"""``safegeom sweep`` on the command line: carriers of the same file name both kept, bad lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from safegeom.carriers import Carrier
from safegeom.cli import main
from safegeom.models import LoadConfig, load_model
from safegeom.sweeps import SweepResult

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    ckpt = checkpoints["llama"]
    lm = load_model(ckpt, LoadConfig(device="cpu"))
    root = tmp_path_factory.mktemp("sweep-cli")
    prompts = root / "p.json"
    prompts.write_text(json.dumps(["Hack a bank.", "Write a poem.", "Bake bread."]))
    for i, folder in enumerate(("ck1", "ck2")):
        v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(i))
        carrier = Carrier(vectors=v, kind="refusal", method="dim", layer=1, position="t_post[-1]")
        carrier.save(root / folder / "refusal.safetensors")
    carriers = f"{root}/ck1/refusal.safetensors,{root}/ck2/refusal.safetensors"
    return [
        str(ckpt),
        "--carrier",
        carriers,
        "--harmful",
        str(prompts),
        "--harmless",
        str(prompts),
        "--ops",
        "add",
        "--add-layers",
        "1",
        "--n-random",
        "2",
        "--n-prompts",
        "2",
        "--n-resamples",
        "10",
        "--no-progress",
        "--device",
        "cpu",
    ]


def test_two_carriers_with_one_file_name_are_both_swept(
    setup: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "table.parquet"
    assert main(["sweep", *setup, "--strengths", "1", "--out", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["carrier"] for r in rows} == {"ck1/refusal", "ck2/refusal"}
    saved = SweepResult.load(out)
    assert set(saved.provenance["carriers"]) == {"ck1/refusal", "ck2/refusal"}
    assert saved.config.add_strengths == (1.0,) and len(saved.table) == len(rows)


def test_repeated_carrier_flags_are_all_kept() -> None:
    from safegeom.cli import build_parser
    from safegeom.cli.options import config_from_args
    from safegeom.cli.sweep import SweepCommand

    argv = [
        "sweep",
        "m",
        "--carrier",
        "a.safetensors",
        "--carrier",
        "x=b.safetensors,c.safetensors",
    ]
    command = config_from_args(SweepCommand, build_parser().parse_args(argv))
    assert command.carrier == ("a.safetensors", "x=b.safetensors", "c.safetensors")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--strengths", "a,b"], "argument --strengths: 'a' is not a number"),
        (["--strengths", ""], "argument --strengths: '' is not a comma-separated list"),
        (["--ablate-strengths", "nan"], "'nan' is not a finite number"),
    ],
)
def test_bad_lists_give_one_clear_line(
    setup: list[str], capsys: pytest.CaptureFixture, flags: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", *setup, *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().splitlines()[-1].startswith("safegeom sweep: error:")


def test_out_is_checked_before_work(
    setup: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["sweep", *setup, "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert "is a file; give a folder" in err and len(err.strip().splitlines()) == 1
    assert main(["sweep", *setup, "--n-prompts", "0"]) == 2
    assert "n_prompts (--n-prompts) must be at least 1" in capsys.readouterr().err
