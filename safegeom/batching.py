"""How many prompts go in one forward pass, and in what order: one heuristic for the package.

Capture, generation and scoring all batch prompts longest first (so padding is small and the
first batch is the largest, where an out-of-memory error shows at once) and size batches with
:func:`auto_batch_size`.

Example:
    >>> list(longest_first([3, 9, 5, 7], 2))
    [[1, 3], [2, 0]]
    >>> auto_batch_size("cpu", max_len=128, bytes_per_prompt=1)
    32
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from safegeom.errors import ConfigError

__all__ = ["CPU_TOKENS_PER_BATCH", "auto_batch_size", "longest_first"]

CPU_TOKENS_PER_BATCH = 4096
"""Tokens per batch on a CPU (at most 64 prompts): cache-friendly and fast on 2 to 16 cores."""
_GPU_MEMORY_FRACTION = 0.4
"""Share of free GPU memory that one batch may take."""


def auto_batch_size(
    device: torch.device | str,
    max_len: int,
    bytes_per_prompt: int,
    *,
    gpu_cap: int = 256,
    batch_size: int | None = None,
) -> int:
    """Prompts per batch: ``batch_size`` when given, else a size that fits the device.

    On a CPU: ``CPU_TOKENS_PER_BATCH // max_len``, between 1 and 64. On CUDA: 40% of the free
    memory over ``bytes_per_prompt``, between 1 and ``gpu_cap``.

    Raises:
        ConfigError: ``batch_size`` below 1.
    """
    if batch_size is not None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1 (--batch-size), got {batch_size}")
        return batch_size
    device = torch.device(device)
    if device.type != "cuda":
        return max(1, min(64, CPU_TOKENS_PER_BATCH // max(max_len, 1)))
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(gpu_cap, int(free * _GPU_MEMORY_FRACTION) // max(bytes_per_prompt, 1)))


def longest_first(lengths: Sequence[int], size: int) -> Iterator[list[int]]:
    """Indices of ``lengths`` in batches of ``size``, longest first (ties keep input order)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), size):
        yield order[start : start + size]
