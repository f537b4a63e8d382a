"""Weights checked for NaN and inf when a model loads, so that a corrupt checkpoint is named as such
instead of surfacing later as a diverged loss or non-finite activations."""

from __future__ import annotations

import torch
from torch import nn

from safegeom.errors import NonFiniteError

__all__ = ["check_finite_weights"]


def check_finite_weights(model: nn.Module, name: str) -> None:
    """Refuse a model with a NaN or inf weight (weights offloaded to disk are not read).

    Raises:
        NonFiniteError: a weight holds NaN or inf; the message names the first such tensor and
            how many of its values are not finite.
    """
    with torch.no_grad():
        for tensor_name, tensor in model.state_dict().items():
            if tensor.device.type == "meta" or not tensor.is_floating_point():
                continue
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise NonFiniteError(
                    f"{name}: weight {tensor_name} holds {bad} NaN/inf value(s) of "
                    f"{tensor.numel()}; the checkpoint is corrupt: re-save or re-download it"
                )
