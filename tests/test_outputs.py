"""Outputs never destroy what safegeom did not write (issue 20, items 1-5).

Special files are refused, an ``--out`` that is an input is refused, a folder is held by one
run at a time (tested with two real processes), and ``--overwrite`` deletes only the files
safegeom wrote.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from safegeom.artifacts import (
    atomic_write,
    save_parquet,
    save_safetensors,
    write_json,
)
from safegeom.cli import main
from safegeom.errors import OutputPathError
from safegeom.outputs import (
    LOCK,
    RECORD,
    check_file_output,
    claim_folder,
    is_safegeom_file,
    remove_written,
    written_files,
)

ROOT = Path(__file__).resolve().parent.parent
HOLD = """
import sys
from safegeom.outputs import claim_folder
with claim_folder(sys.argv[1], command="train"):
    (__import__("pathlib").Path(sys.argv[1]) / "half.json").write_text("{}")
    print("held", flush=True)
    sys.stdin.readline()
"""
"""A second process: claims the folder, writes a file, says so, and waits."""


def _node(path: Path) -> None:
    """A private character device with ``/dev/null``'s numbers (root only)."""
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))


def _holder(folder: Path) -> subprocess.Popen[str]:
    """Start a process that holds ``folder``; returns once it does."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


# --- item 1: special files ---------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_a_device_node_is_never_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = tmp_path / "null"
    _node(node)
    with pytest.raises(OutputPathError, match=r"null is a character device, not a regular file"):
        write_json(node, {"a": 1})
    capture = ["capture", "tiny-chat", "--prompts", "advbench:val", "--limit", "2"]
    for argv in (
        [*capture, "--out", str(node)],
        [*capture, "--stats", "--out", str(node)],
        ["evaluate", "tiny-chat", "--prompts", "advbench:val", "--out", str(node)],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"--out {node} is a character device, not a regular file; give a file path" in err
    assert stat.S_ISCHR(node.stat().st_mode)  # still the device
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]  # and no temporary left


def test_a_fifo_is_refused_by_every_file_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    capture = ["capture", "tiny-chat", "--prompts", "advbench:val", "--limit", "2"]
    for argv in (
        [*capture, "--out", str(fifo)],
        [*capture, "--stats", "--out", str(fifo)],
        ["evaluate", "tiny-chat", "--prompts", "advbench:val", "--out", str(fifo)],
    ):
        assert main(argv) == 2
        assert f"--out {fifo} is a FIFO (named pipe), not a regular file" in capsys.readouterr().err
    assert main(["carriers", "tiny-chat", "--out", str(fifo)]) == 2
    assert f"--out {fifo} is a FIFO (named pipe); give a folder" in capsys.readouterr().err
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_the_rename_checks_the_target_again(tmp_path: Path) -> None:
    target = tmp_path / "late"
    with pytest.raises(OutputPathError, match="late is a FIFO"), atomic_write(target) as tmp:
        tmp.write_text("x")
        os.mkfifo(target)  # appears while the body runs
    assert stat.S_ISFIFO(target.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late"]


def test_a_link_is_followed_and_kept(tmp_path: Path) -> None:
    real = write_json(tmp_path / "real.json", {"v": 1})
    (tmp_path / "link.json").symlink_to(real)
    write_json(tmp_path / "link.json", {"v": 2})
    assert (tmp_path / "link.json").is_symlink()
    assert json.loads(real.read_text()) == {"v": 2}


# --- item 3: an output that is an input --------------------------------------------------------


def test_an_out_equal_to_an_input_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\nHow do I bake bread?\n")
    assert main(["capture", "tiny-chat", "--prompts", str(prompts), "--out", str(prompts)]) == 2
    err = capsys.readouterr().err
    assert f"--out {prompts} is also an input ({prompts}); choose another --out" in err
    assert main(["evaluate", "tiny-chat", "--prompts", f"{prompts}", "--out", str(prompts)]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert prompts.read_text() == "prompt\nHow do I bake bread?\n"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert main(["carriers", str(model), "--out", str(model)]) == 2
    assert f"--out {model} is also an input ({model})" in capsys.readouterr().err
    assert main(["train", "lora", str(model), "--task", "harmful:2", "--out", str(model)]) == 2
    assert f"--out {model} is also an input ({model})" in capsys.readouterr().err
    carrier = tmp_path / "refusal.safetensors"
    save_safetensors(carrier, {"v": torch.ones(2)}, {"format": "safegeom.carrier/1"})
    with pytest.raises(OutputPathError, match="is also an input"):
        check_file_output(carrier, inputs=[f"r={carrier}"])
    assert list(os.listdir(model)) == ["config.json"]


# --- item 5: files safegeom did not write -------------------------------------------------------


def test_safegeom_files_are_told_by_their_marker(tmp_path: Path) -> None:
    ours = [
        write_json(tmp_path / "r.json", {"format": "safegeom.eval/1"}),
        save_safetensors(tmp_path / "a.safetensors", {"x": torch.ones(1)}, {"k": 1}),
        save_parquet(tmp_path / "t.parquet", pd.DataFrame({"a": [1]})),
    ]
    assert all(is_safegeom_file(p) for p in ours)
    (tmp_path / "mine.json").write_text('{"format": "mine/1"}')
    (tmp_path / "mine.csv").write_text("a,b\n")
    save_file({"x": torch.ones(1)}, str(tmp_path / "mine.safetensors"))
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "mine.parquet")
    (tmp_path / "empty").write_bytes(b"")
    theirs = ["mine.json", "mine.csv", "mine.safetensors", "mine.parquet", "empty"]
    assert not any(is_safegeom_file(tmp_path / name) for name in theirs)


def test_a_file_output_never_replaces_a_users_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    precious = tmp_path / "precious.csv"
    precious.write_text("mine\n")
    assert main(["evaluate", "tiny-chat", "--prompts", "advbench:val", "--out", str(precious)]) == 2
    assert (
        f"--out {precious} exists and safegeom did not write it; choose another --out, or pass "
        "--overwrite to replace it" in capsys.readouterr().err
    )
    sidecar = tmp_path / "acts.safetensors.json"
    sidecar.write_text('{"mine": true}')
    argv = ["capture", "tiny-chat", "--prompts", "advbench:val", "--out", str(tmp_path / "acts")]
    assert main([*argv[:-1], f"{tmp_path / 'acts.safetensors'}"]) == 2
    assert f"{sidecar} exists and safegeom did not write it" in capsys.readouterr().err
    assert precious.read_text() == "mine\n" and sidecar.read_text() == '{"mine": true}'
    assert check_file_output(precious, overwrite=True) == precious  # the user said so
    ours = write_json(tmp_path / "eval.json", {"format": "safegeom.eval/1"})
    assert check_file_output(ours) == ours  # a result safegeom wrote is simply replaced


# --- items 2, 4, 5: folders --------------------------------------------------------------------


def test_a_second_writer_fails_at_once_naming_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "run"
    proc = _holder(folder)
    try:
        lock = json.loads((folder / LOCK).read_text())
        assert lock["pid"] == proc.pid and lock["command"] == "train"
        start = time.monotonic()
        with pytest.raises(OutputPathError) as caught, claim_folder(folder, command="audit"):
            pass
        message = str(caught.value)
        assert f"--out {folder} is in use by another safegeom run (pid {proc.pid} on " in message
        assert f"safegeom train, started {lock['started']}); wait for it to finish" in message
        for argv in (
            ["train", "lora", "tiny-chat", "--task", "harmful:2", "--out", str(folder)],
            ["carriers", "tiny-chat", "--out", str(folder)],
            ["figures", str(tmp_path), "--out", str(folder)],
        ):
            assert main(argv) == 2
            assert f"in use by another safegeom run (pid {proc.pid} " in capsys.readouterr().err
        assert time.monotonic() - start < 30  # at once: nothing loaded, nothing waited for
    finally:
        proc.kill()  # no clean exit: the kernel drops the lock
        proc.wait()
    with claim_folder(folder, command="audit"):  # free again
        assert json.loads((folder / LOCK).read_text())["pid"] == os.getpid()
    assert not (folder / LOCK).exists()
    # the killed run never recorded its writes; the next claim counts them as safegeom's
    assert written_files(folder) == ["half.json"]


def test_claims_nest_and_a_failed_start_leaves_no_folder(tmp_path: Path) -> None:
    folder = tmp_path / "new"
    with claim_folder(folder, command="demo"), claim_folder(folder, command="train"):
        (folder / "a.json").write_text("{}")
    assert written_files(folder) == ["a.json"] and not (folder / LOCK).exists()
    other = tmp_path / "failed"
    with pytest.raises(RuntimeError), claim_folder(other, command="carriers"):
        raise RuntimeError("bad flags")
    assert not other.exists()


def test_overwrite_deletes_only_what_safegeom_wrote(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "mine.txt").write_text("mine")
    with (
        pytest.raises(
            OutputPathError,
            match=r"holds files safegeom did not write \(checkpoints/mine.txt\); choose an empty "
            r"folder, or pass --overwrite to write beside them \(they are kept\)",
        ),
        claim_folder(folder, command="audit"),
    ):
        pass
    with claim_folder(folder, command="audit", overwrite=True):
        write_json(folder / "checkpoints" / "a.json", {"format": "safegeom.x/1"})
        write_json(folder / "sub" / "b.json", {"format": "safegeom.x/1"})
    assert written_files(folder) == ["checkpoints/a.json", "sub/b.json"]
    with claim_folder(folder, command="audit", overwrite=True):
        assert remove_written(folder) == ["checkpoints/a.json", "sub/b.json"]
    assert (folder / "checkpoints" / "mine.txt").read_text() == "mine"
    assert not (folder / "sub").exists() and written_files(folder) == []
    nested = folder / "figures"
    with claim_folder(nested, command="figures", overwrite=True):
        (nested / "fig.png").write_bytes(b"png")
    with claim_folder(folder, command="audit", overwrite=True):  # a claimed folder of its own
        assert remove_written(folder) == []
    assert (nested / "fig.png").exists() and (nested / RECORD).exists()


def test_carriers_refuses_a_folder_of_the_users_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "summary.json").write_text('{"mine": 1}')
    assert main(["carriers", "tiny-chat", "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"--out {folder} holds files safegeom did not write (summary.json)" in err
    assert (folder / "summary.json").read_text() == '{"mine": 1}'
    assert sorted(os.listdir(folder)) == ["summary.json"]
