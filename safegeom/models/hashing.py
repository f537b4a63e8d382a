"""A sha256 that names a model's weights, wherever they live (one device, several, or offloaded)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from safegeom.models.placement import offloaded_tensor

__all__ = ["weight_hash"]

_HASH_FULL_LIMIT = 100_000_000
"""Models with at most this many parameters are hashed in full; larger ones are fingerprinted."""


def weight_hash(model: nn.Module) -> str:
    """Return a hex sha256 identifying a model's weights.

    Models with at most 10⁸ parameters are hashed in full (names, shapes, dtypes and every byte).
    Larger models are fingerprinted: names, shapes, dtypes and a fixed strided sample of 4,096
    elements per tensor; the result is prefixed ``fp:`` to say so. Any fine-tuning step changes
    the sampled elements, so checkpoints along a trajectory still get distinct hashes. Weights a
    device map offloaded are read from where accelerate keeps them: the hash does not depend on
    where the model lives.
    """
    state = model.state_dict()
    total = sum(t.numel() for t in state.values())
    full = total <= _HASH_FULL_LIMIT
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = offloaded_tensor(model, name, state[name]).detach()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        flat = tensor.reshape(-1)
        if not full and flat.numel() > 4096:
            step = flat.numel() // 4096
            flat = flat[:: max(step, 1)][:4096]
        digest.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return ("" if full else "fp:") + digest.hexdigest()
