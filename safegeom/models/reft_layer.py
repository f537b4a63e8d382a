"""The pieces of the RefusalGuard edit: its config, the orthonormal rows R, one layer's Φ − id.

See :mod:`safegeom.models.reft` for the edit as a whole (docs/methods.md §6, a proposal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from safegeom.config import check
from safegeom.errors import SafegeomError

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "TENSOR_FILE",
    "ReftConfig",
    "ReftLayer",
    "as_cone_basis",
    "orthonormal_rows",
]

FORMAT = "safegeom.refusalguard/1"
CONFIG_FILE = "refusalguard.json"
TENSOR_FILE = "refusalguard.safetensors"
_ORTHO_TOL = 1e-4


@dataclass(frozen=True)
class ReftConfig:
    """Where and how wide the RefusalGuard edit is (docs/methods.md §6, a proposal)."""

    layers: tuple[int, ...]
    """Decoder blocks edited (the set S), 0-based."""
    rank: int = 4
    """Rows r of R and W: the width of the learnt low-rank edit (1 ≤ r ≤ hidden size)."""
    first_k: int = 5
    """Edit the first this many real prompt tokens of each row."""
    last_k: int = 5
    """Edit the last this many real prompt tokens of each row."""
    site: Literal["resid_pre", "resid_post"] = "resid_pre"
    """Where in the block: its input (resid_pre) or its output (resid_post)."""
    edit_generated: bool = False
    """Also edit generated (and answer) tokens; off as in LoReFT, which edits prompt positions only."""

    def __post_init__(self) -> None:
        layers = self.layers
        if isinstance(layers, int):
            layers = (layers,)
        ok = all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
        check(ok, "layers", "must be block indices (integers)", self.layers)
        object.__setattr__(self, "layers", tuple(int(x) for x in layers))
        check(bool(self.layers), "layers", "must name at least one layer", self.layers)
        check(min(self.layers) >= 0, "layers", "must be non-negative block indices", self.layers)
        unique = len(set(self.layers)) == len(self.layers)
        check(unique, "layers", "must not repeat a layer", self.layers)
        check(self.rank >= 1, "rank", "must be at least 1", self.rank)
        check(self.first_k >= 0, "first_k", "must be 0 or more", self.first_k)
        check(self.last_k >= 0, "last_k", "must be 0 or more", self.last_k)
        some = self.first_k + self.last_k > 0
        check(some, "last_k", "and first_k are both 0: no position would be edited", self.last_k)
        ok_site = self.site in ("resid_pre", "resid_post")
        check(ok_site, "site", "must be resid_pre or resid_post", self.site)


def orthonormal_rows(free: Float[Tensor, "r d"]) -> Float[Tensor, "r d"]:
    """The r × d matrix with orthonormal rows spanning ``free``'s rows (QR, diag of R₀ > 0)."""
    q, r0 = torch.linalg.qr(free.T)
    signs = torch.where(torch.diagonal(r0) < 0, -1.0, 1.0).to(q.dtype)
    return (q * signs).T


def as_cone_basis(basis: Tensor, d_model: int, layer: int) -> Float[Tensor, "d k"]:
    """``basis`` as a float32 ``[d, k]`` matrix (a ``[d]`` vector is k = 1).

    Raises:
        SafegeomError: the wrong hidden size, NaN/inf, or columns that are not orthonormal.
    """
    b = torch.as_tensor(basis).detach().to(torch.float32)
    b = b[:, None] if b.dim() == 1 else b
    if b.dim() != 2 or b.shape[0] != d_model:
        raise SafegeomError(
            f"cone basis of layer {layer} has shape {tuple(basis.shape)}, but the hidden size is "
            f"{d_model}: pass a [{d_model}, k] basis with orthonormal columns, from this model"
        )
    if not torch.isfinite(b).all():
        raise SafegeomError(f"cone basis of layer {layer} contains NaN or inf")
    gram = b.double().T @ b.double()
    err = float((gram - torch.eye(b.shape[1], dtype=torch.float64)).abs().max())
    if err > _ORTHO_TOL:
        raise SafegeomError(
            f"cone basis of layer {layer} is not orthonormal (max |BᵀB − I| = {err:.2g}); "
            "orthonormalise it first (e.g. torch.linalg.qr) or pass a carrier's basis"
        )
    return b


class ReftLayer(nn.Module):
    """One layer's edit: ``delta(h) = P⊥ Rᵀ(W h + b − R h)``; parameters A (R = QR(A)), W, b."""

    def __init__(self, basis: Float[Tensor, "d k"], rank: int, generator: torch.Generator) -> None:
        super().__init__()
        d = basis.shape[0]
        # Row-major, as a checkpoint loads it (QR gives column-major): the same kernels run on the
        # edit in memory and on its reloaded copy, so their outputs are equal bit for bit.
        self.register_buffer("basis", basis.clone(memory_format=torch.contiguous_format))
        self.free = nn.Parameter(torch.randn(rank, d, generator=generator).to(basis.device))
        self.weight = nn.Parameter(orthonormal_rows(self.free.detach()).clone())
        self.bias = nn.Parameter(torch.zeros(rank, device=basis.device))

    @property
    def rotation(self) -> Float[Tensor, "r d"]:
        """R: the orthonormal rows, recomputed from the free matrix A."""
        return orthonormal_rows(self.free)

    def forward(self, hidden: Float[Tensor, "*n d"]) -> Float[Tensor, "*n d"]:
        """The change ``Φ(h) − h`` (float32, in the hidden state's units), zero along the cone."""
        rot = self.rotation
        low = hidden @ (self.weight - rot).T + self.bias
        delta = low @ rot
        return delta - (delta @ self.basis) @ self.basis.T
