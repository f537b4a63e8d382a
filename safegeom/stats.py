"""Streaming float64 statistics of activations.

A :class:`RunningStats` fitter accumulates the mean (and optionally the covariance over the hidden
dimension) of activation batches without ever holding all of them, in the spirit of
concept-erasure's fitters: fit with :meth:`RunningStats.update`, then :meth:`RunningStats.finalize`
into a frozen :class:`Moments` value that can be saved, loaded and compared.

Batches are merged with the parallel algorithm of Chan, Golub and LeVeque (1979): each batch is
centred on its own mean (a two-pass computation inside the batch), and the batch's sum of squares is
combined with the running one through the difference of means. All arithmetic is float64, whatever
the input dtype, so bf16 activations from millions of prompts give means and covariances that match
a single float64 pass to rounding error.

Shapes: each sample has a fixed trailing ``shape``, for example ``(n_layers, n_pos, d)``. The mean has
that shape; the covariance is taken over the last dimension only, separately for each leading index,
so it has shape ``(*shape[:-1], d, d)``.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from safegeom.artifacts import read_safetensors, save_safetensors
from safegeom.errors import ArtifactError, NonFiniteError, SafegeomError

__all__ = ["Moments", "RunningStats", "diff_in_means"]

_FORMAT = "safegeom.moments/1"


def _check_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except TypeError as err:
        raise SafegeomError(f"shape must be a tuple of ints, got {shape!r}") from err
    if len(out) == 0:
        raise SafegeomError("shape must have at least one dimension (the hidden size d)")
    if any(s <= 0 for s in out):
        raise SafegeomError(f"shape must have positive sizes, got {out}")
    return out


def _outer_sum(x: Float[Tensor, "batch *lead d"]) -> Float[Tensor, "*lead d d"]:
    """Sum over the batch of outer products over the last dim: ``Σ_b x_b x_bᵀ`` per leading index."""
    return torch.einsum("b...i,b...j->...ij", x, x)


class RunningStats:
    """Float64 running mean and (optionally) covariance of vectors of a fixed trailing shape.

    Args:
        shape: trailing shape of each sample, e.g. ``(n_layers, n_pos, d)``. The last entry is the
            hidden size ``d``.
        covariance: also accumulate the covariance over the last dim (per leading index), of shape
            ``(*shape[:-1], d, d)``. Memory is ``8·prod(shape[:-1])·d²`` bytes: switch it off when
            only means are needed.
        device: where the float64 accumulators live (default CPU). Inputs are moved there.

    Attributes:
        n: number of samples seen so far.
        mean: float64 running mean, shape ``shape`` (zeros while ``n == 0``).
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        *,
        covariance: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        self.shape: tuple[int, ...] = _check_shape(shape)
        self.device: torch.device = (
            torch.device(device) if device is not None else torch.device("cpu")
        )
        self.track_covariance: bool = bool(covariance)
        self.n: int = 0
        self.mean: Float[Tensor, "*shape"] = torch.zeros(
            self.shape, dtype=torch.float64, device=self.device
        )
        d = self.shape[-1]
        # Sum of squared deviations from the running mean (the "M2" of Welford/Chan), per leading index.
        self._m2: Float[Tensor, "*lead d d"] | None = (
            torch.zeros((*self.shape[:-1], d, d), dtype=torch.float64, device=self.device)
            if self.track_covariance
            else None
        )

    def __repr__(self) -> str:
        return (
            f"RunningStats(shape={self.shape}, n={self.n}, covariance={self.track_covariance}, "
            f"device={self.device})"
        )

    def _validate_batch(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            x = torch.as_tensor(x)
        if not (x.is_floating_point()):
            raise SafegeomError(
                f"expected a floating-point tensor of activations, got dtype {x.dtype}"
            )
        if x.ndim != len(self.shape) + 1 or tuple(x.shape[1:]) != self.shape:
            raise SafegeomError(
                f"shape mismatch: expected activations of shape [batch, {', '.join(map(str, self.shape))}]"
                f", got {list(x.shape)}"
            )
        if not bool(torch.isfinite(x).all()):
            n_bad = int((~torch.isfinite(x)).sum())
            raise NonFiniteError(
                f"NaN or inf in activations ({n_bad} non-finite values in a batch of shape "
                f"{list(x.shape)}); check the model dtype and the capture positions"
            )
        return x

    # The leading space in " batch *shape" stops ruff reading the jaxtyping string as Python (F821).
    @torch.no_grad()
    def update(self, x: Float[Tensor, " batch *shape"]) -> None:
        """Add a batch of samples ``x`` of shape ``[batch, *shape]`` (any float dtype, cast to float64).

        A batch of size 0 is a no-op. Raises SafegeomError on a shape mismatch or NaN/inf values.
        """
        x = self._validate_batch(x)
        b = int(x.shape[0])
        if b == 0:
            return
        x64 = x.to(device=self.device, dtype=torch.float64)
        batch_mean = x64.mean(dim=0)
        batch_m2 = _outer_sum(x64 - batch_mean) if self._m2 is not None else None
        self._combine(b, batch_mean, batch_m2)

    def _combine(self, n_b: int, mean_b: Tensor, m2_b: Tensor | None) -> None:
        """Chan et al. merge of (n_b, mean_b, m2_b) into this accumulator, in place."""
        n_a = self.n
        n = n_a + n_b
        delta = mean_b - self.mean
        if n_a == 0:
            self.mean = mean_b.clone()
        else:
            self.mean = self.mean + delta * (n_b / n)
        if self._m2 is not None:
            assert m2_b is not None
            if n_a == 0:
                self._m2 = m2_b.clone()
            else:
                outer = delta.unsqueeze(-1) * delta.unsqueeze(-2)
                self._m2 = self._m2 + m2_b + outer * (n_a * n_b / n)
        self.n = n

    def merge(self, other: "RunningStats") -> "RunningStats":
        """Combine two accumulators (e.g. from different ranks) into a new one; neither is changed.

        The result lives on ``self``'s device and tracks covariance only if both do.
        """
        if not isinstance(other, RunningStats):
            raise SafegeomError(f"can only merge RunningStats with RunningStats, got {type(other)}")
        if other.shape != self.shape:
            raise SafegeomError(f"shape mismatch in merge: {self.shape} vs {other.shape}")
        both_cov = self._m2 is not None and other._m2 is not None
        out = RunningStats(self.shape, covariance=both_cov, device=self.device)
        out.n = self.n
        out.mean = self.mean.clone()
        if both_cov:
            assert self._m2 is not None
            out._m2 = self._m2.clone()
        if other.n > 0:
            m2_other = other._m2.to(self.device) if both_cov and other._m2 is not None else None
            out._combine(other.n, other.mean.to(self.device), m2_other)
        return out

    def covariance(self, ddof: int = 1) -> Float[Tensor, "*lead d d"]:
        """Float64 covariance over the last dim, shape ``(*shape[:-1], d, d)``, divided by ``n - ddof``.

        Raises SafegeomError when covariance is not tracked or ``n <= ddof``.
        """
        if self._m2 is None:
            raise SafegeomError(
                "covariance was not tracked: construct RunningStats(..., covariance=True)"
            )
        if self.n - ddof <= 0:
            raise SafegeomError(
                f"need more than ddof={ddof} samples for a covariance, have n={self.n}"
            )
        return self._m2 / (self.n - ddof)

    def finalize(self, ddof: int = 1) -> "Moments":
        """Freeze into :class:`Moments` (mean, and covariance with ``ddof`` if tracked).

        Raises SafegeomError when no samples were seen, or when covariance is tracked and ``n <= ddof``.
        """
        if self.n == 0:
            raise SafegeomError(
                "no samples: call update() with at least one batch before finalize()"
            )
        cov = self.covariance(ddof) if self._m2 is not None else None
        return Moments(
            n=self.n,
            mean=self.mean.clone(),
            cov=cov.clone() if cov is not None else None,
            ddof=ddof,
        )


@dataclass(frozen=True)
class Moments:
    """Frozen first and second moments of a set of activation vectors.

    Attributes:
        n: number of samples.
        mean: float64 mean, shape ``shape``.
        cov: float64 covariance over the last dim, shape ``(*shape[:-1], d, d)``, or None.
        ddof: the delta degrees of freedom ``cov`` was divided by (``n - ddof``).
    """

    n: int
    mean: Float[Tensor, "*shape"]
    cov: Float[Tensor, "*lead d d"] | None = None
    ddof: int = 1

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise SafegeomError(f"Moments need n > 0, got n={self.n}")
        if self.mean.ndim == 0:
            raise SafegeomError("Moments.mean must have at least one dimension (the hidden size d)")
        if self.cov is not None:
            d = self.mean.shape[-1]
            want = (*self.mean.shape[:-1], d, d)
            if tuple(self.cov.shape) != want:
                raise SafegeomError(
                    f"shape mismatch: cov should be {want}, got {tuple(self.cov.shape)}"
                )

    @property
    def shape(self) -> tuple[int, ...]:
        """Trailing shape of each sample (the shape of ``mean``)."""
        return tuple(self.mean.shape)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a safetensors file (tensors ``mean`` and optionally ``cov``) with JSON metadata.

        The metadata (``n``, ``shape``, ``ddof``, format tag) is stored as a JSON string under the
        ``safegeom`` key of the safetensors header, so one file carries everything. The write is
        atomic (:func:`safegeom.artifacts.save_safetensors`). Returns the path written.
        """
        tensors = {"mean": self.mean.detach().to("cpu", torch.float64).contiguous()}
        if self.cov is not None:
            tensors["cov"] = self.cov.detach().to("cpu", torch.float64).contiguous()
        meta = {
            "format": _FORMAT,
            "n": int(self.n),
            "shape": list(self.shape),
            "ddof": int(self.ddof),
            "has_cov": self.cov is not None,
        }
        return save_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: torch.device | str = "cpu") -> "Moments":
        """Read a file written by :meth:`save`; checks that the stored shape matches the tensors.

        Raises:
            NotFoundError: no file at ``path``.
            ArtifactError: not a safegeom Moments file, or its shape does not match.
        """
        path = Path(path)
        tensors, meta = read_safetensors(path, what="moments file", device=str(device))
        if meta.get("format") != _FORMAT:
            raise ArtifactError(f"{path}: unsupported moments format {meta.get('format')!r}")
        mean = tensors["mean"]
        if list(mean.shape) != list(meta["shape"]):
            raise ArtifactError(
                f"{path}: stored shape {meta['shape']} does not match mean {list(mean.shape)}"
            )
        return cls(n=int(meta["n"]), mean=mean, cov=tensors.get("cov"), ddof=int(meta["ddof"]))


def _moments_of(x: Moments | RunningStats, name: str) -> tuple[int, Tensor]:
    if isinstance(x, (Moments, RunningStats)):
        return x.n, x.mean
    raise SafegeomError(f"{name} must be Moments or RunningStats, got {type(x).__name__}")


def diff_in_means(a: Moments | RunningStats, b: Moments | RunningStats) -> Float[Tensor, "*shape"]:
    """Float64 difference of means ``mean_a − mean_b`` (e.g. harmful − harmless), on ``a``'s device.

    Raises SafegeomError on a shape mismatch or when either side has no samples.
    """
    n_a, mean_a = _moments_of(a, "a")
    n_b, mean_b = _moments_of(b, "b")
    if n_a == 0 or n_b == 0:
        raise SafegeomError(f"diff_in_means needs samples on both sides, got n_a={n_a}, n_b={n_b}")
    if tuple(mean_a.shape) != tuple(mean_b.shape):
        raise SafegeomError(
            f"shape mismatch in diff_in_means: {tuple(mean_a.shape)} vs {tuple(mean_b.shape)}"
        )
    return mean_a.to(torch.float64) - mean_b.to(device=mean_a.device, dtype=torch.float64)
