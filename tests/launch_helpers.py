"""Starting a module as several ranks, as a launcher would: the two-process tests share this."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 150
"""Every rank must finish within this (a hang fails the test instead of blocking the suite)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(module: str, args: list[str], logs: Path, world: int = 2) -> list[tuple[int, str, str]]:
    """Run ``python -m MODULE ARGS`` as ``world`` ranks with the environment a launcher sets
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...), output to files in ``logs`` (so no pipe fills
    up); kill them on a hang; once more on a new port if the port was taken.

    Returns:
        ``(exit status, stdout, stderr)`` per rank.
    """
    for _ in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "CUDA"))}
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
            WORLD_SIZE=str(world),
            OMP_NUM_THREADS="1",
            CUDA_VISIBLE_DEVICES="",
            PYTHONPATH=str(ROOT),
        )
        files = [(logs / f"rank{r}.out", logs / f"rank{r}.err") for r in range(world)]
        procs = []
        for r, (out, err) in enumerate(files):
            with out.open("w") as sink, err.open("w") as errors:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", module, *args],
                        cwd=ROOT,
                        stdout=sink,
                        stderr=errors,
                        env={
                            **env,
                            "RANK": str(r),
                            "LOCAL_RANK": str(r),
                            "LOCAL_WORLD_SIZE": str(world),
                        },
                    )
                )
        try:
            codes = [proc.wait(timeout=TIMEOUT_S) for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        runs = [(c, o.read_text(), e.read_text()) for c, (o, e) in zip(codes, files, strict=True)]
        if not any("address already in use" in err.lower() for _, _, err in runs):
            break
    return runs
