"""Peak resident-set size of one pass in this process (Linux VmHWM, else sampling)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import threading
from contextlib import AbstractContextManager
from pathlib import Path


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc), so that a pass cannot hide its peak by
    reusing memory that model building freed but the allocator kept."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class CpuPeak(AbstractContextManager):
    """Peak resident set size above the level at entry.

    Uses Linux's resettable high-water mark (``/proc/self/clear_refs`` + ``VmHWM``) where
    available, else samples the RSS with psutil every millisecond, else ``ru_maxrss``.
    """

    peak: int

    def __enter__(self) -> CpuPeak:
        trim_heap()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.mode, self.base = "hwm", self._status("VmRSS")
        except OSError:
            self._start_sampler()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.mode == "hwm":
            self.peak = self._status("VmHWM") - self.base
        elif self.mode == "psutil":
            self._stop.set()
            self._thread.join()
            self.peak = self._max - self.base
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise OSError(f"no {key} in /proc/self/status")

    def _start_sampler(self) -> None:
        try:
            import psutil
        except ImportError:  # last resort: the lifetime peak (an underestimate of the delta)
            self.mode = "maxrss"
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            return
        self.mode = "psutil"
        process = psutil.Process()
        self.base = self._max = process.memory_info().rss
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.001):
                self._max = max(self._max, process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
