"""A full disk while writing is one line, and the temporary file is gone: the file that was there
before is untouched."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError

from safegeom.artifacts import atomic_write, save_safetensors, write_text
from safegeom.errors import OutputPathError


def test_enospc_from_the_writer_is_one_line_and_leaves_no_temp(tmp_path: Path) -> None:
    target = write_text(tmp_path / "result.json", "before\n")
    full = pytest.raises(OutputPathError, match=r"result\.json: no space left on device")
    with full as err, atomic_write(target):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert len(str(err.value).splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
    assert target.read_text() == "before\n"


def test_safetensors_disk_full_is_one_line(tmp_path: Path, monkeypatch) -> None:
    def full(*args, **kwargs):  # what safetensors raises when the disk fills up mid-write
        Path(args[1]).write_bytes(b"partial")
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OutputPathError, match=r"no space left on device; free some space"):
        save_safetensors(tmp_path / "w.safetensors", {"w": torch.zeros(2)}, {})
    assert list(tmp_path.iterdir()) == []


def test_other_errors_pass_through_unchanged(tmp_path: Path) -> None:
    denied = pytest.raises(OSError, match="Permission denied")
    with denied as err, atomic_write(tmp_path / "x.txt"):
        raise OSError(errno.EACCES, "Permission denied")
    assert not isinstance(err.value, OutputPathError)
    assert list(tmp_path.iterdir()) == []
