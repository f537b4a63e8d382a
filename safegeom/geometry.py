"""Pure geometry of carriers: cosines, principal angles, drift, effective rank, coupling.

Every function accepts torch tensors or numpy arrays (any float dtype), computes in float64 on the
CPU and returns Python floats or numpy arrays. Angles are in **radians**.

Conventions:
- A *direction* is a 1-D vector of length ``d`` (the hidden size).
- A *subspace* is given by a 2-D matrix whose columns (``d × k``) or rows (``k × d``) span it. The
  hidden axis is the one of length ``d``; when ``d`` is not given it is inferred (the other argument's
  hidden size, else the longer axis, else columns for a square matrix). A 1-D vector is the
  1-dimensional subspace it spans.
- Bad inputs (NaN/inf, zero vectors, mismatched hidden sizes, wrong ranks) raise SafegeomError (a ValueError)
  with a one-line message.

Where the papers are silent (docs/methods.md §4 and §5) the choices are ours and are marked
*proposal*: effective rank, coordinate statistics and imbalance, the subspace form of coupling.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from numpy.typing import NDArray

from safegeom.errors import ConfigError, NonFiniteError, SafegeomError

__all__ = [
    "coordinate_imbalance",
    "coordinate_statistics",
    "cosine",
    "coupling",
    "direction_drift",
    "effective_rank",
    "grassmann_distance",
    "orthonormal_basis",
    "principal_angles",
    "sign_fix",
    "subspace_drift",
    "unit",
]

ArrayLike = Any  # torch.Tensor | np.ndarray | sequence of floats
F64 = NDArray[np.float64]

# Norms below this are treated as zero (inputs are activations/directions of order 1e-3 or larger).
_ZERO_NORM = 1e-300


def _to_f64(x: ArrayLike, name: str) -> F64:
    """Convert a tensor/array to a float64 numpy array, rejecting NaN/inf and empty inputs."""
    if isinstance(x, torch.Tensor):
        arr = x.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            arr = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise SafegeomError(f"{name} must be numeric, got {type(x).__name__}") from err
    if arr.size == 0:
        raise SafegeomError(f"{name} is empty (shape {arr.shape})")
    if not np.all(np.isfinite(arr)):
        raise NonFiniteError(f"{name} contains NaN or inf")
    return arr


def _vector(x: ArrayLike, name: str) -> F64:
    v = _to_f64(x, name)
    if v.ndim != 1:
        raise SafegeomError(f"{name} must be a 1-D direction, got shape {v.shape}")
    if np.linalg.norm(v) <= _ZERO_NORM:
        raise SafegeomError(f"{name} is a zero vector")
    return v


def _same_size(a: F64, b: F64, na: str, nb: str) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise SafegeomError(
            f"hidden size mismatch: {na} has d={a.shape[-1]}, {nb} has d={b.shape[-1]}"
        )


def _columns(m: F64, name: str, d: int | None) -> F64:
    """Return ``m`` as a ``d × k`` matrix (columns span the subspace)."""
    if m.ndim == 1:
        if d is not None and m.shape[0] != d:
            raise SafegeomError(f"hidden size mismatch: {name} has d={m.shape[0]}, expected d={d}")
        return m[:, None]
    if m.ndim != 2:
        raise SafegeomError(
            f"{name} must be 1-D (a direction) or 2-D (a basis), got shape {m.shape}"
        )
    rows, cols = m.shape
    if d is None:
        return m if rows >= cols else m.T
    if rows == d:
        return m
    if cols == d:
        return m.T
    raise SafegeomError(f"hidden size mismatch: {name} has shape {m.shape}, neither axis is d={d}")


def _hidden_size(x: F64) -> int:
    return int(x.shape[0]) if x.ndim == 1 else int(max(x.shape))


def unit(v: ArrayLike) -> F64:
    """Unit vector ``v / ‖v‖`` (float64 numpy array). Raises ValueError for a zero vector."""
    x = _vector(v, "v")
    return x / np.linalg.norm(x)


def cosine(a: ArrayLike, b: ArrayLike) -> float:
    """Cosine similarity of two directions, a float in [-1, 1] (the cosine of the angle in radians)."""
    x, y = _vector(a, "a"), _vector(b, "b")
    _same_size(x, y, "a", "b")
    c = float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))
    return float(np.clip(c, -1.0, 1.0))


def orthonormal_basis(M: ArrayLike, rank_tol: float = 1e-10, *, d: int | None = None) -> F64:
    """Orthonormal basis ``d × r`` of the span of the vectors in ``M``.

    ``M`` is ``d × k`` (vectors as columns), ``k × d`` (vectors as rows) or a 1-D vector; ``d`` says
    which axis is the hidden one (default: the longer axis, columns if square). ``r`` is the numerical
    rank: singular values below ``rank_tol · σ_max`` are dropped.

    When the vectors are linearly independent (``r == k``) the basis is the QR (Gram–Schmidt) basis
    with signs fixed so that column ``j`` has a positive projection on input vector ``j``: the first
    column is the first input vector, normalised. Otherwise the leading left singular vectors are
    returned. Raises ValueError for a zero matrix, NaN/inf, or a hidden-size mismatch.
    """
    return _basis(_to_f64(M, "M"), "M", d, rank_tol)


def _basis(m: F64, name: str, d: int | None, rank_tol: float = 1e-10) -> F64:
    """Implementation of :func:`orthonormal_basis` on a validated array; ``name`` for messages."""
    A = _columns(m, name, d)
    s = np.linalg.svd(A, compute_uv=False)
    if s[0] <= _ZERO_NORM:
        raise SafegeomError(f"{name} is zero: cannot build a basis from zero vectors")
    r = int(np.sum(s > rank_tol * s[0]))
    if r == A.shape[1]:
        Q, R = np.linalg.qr(A)
        signs = np.where(np.diag(R) < 0, -1.0, 1.0)
        return Q * signs
    U, _, _ = np.linalg.svd(A, full_matrices=False)
    return U[:, :r]


def principal_angles(A: ArrayLike, B: ArrayLike, *, hidden_size: int | None = None) -> F64:
    """Principal angles between span(A) and span(B), in radians, ascending, each in [0, π/2].

    ``A`` and ``B`` are ``d × k`` or ``k × d`` bases (need not be orthonormal) or 1-D directions
    (1-dimensional subspaces). With ranks ``k1`` and ``k2`` there are ``min(k1, k2)`` angles.

    Computed from orthonormalised bases ``QA``, ``QB``: cosines are the singular values of
    ``QAᵀ QB`` clipped to [0, 1]; for small angles (cos² ≥ ½) the sines, from the singular values of
    the residual of one basis projected off the other, are used instead, which is accurate near 0
    (Knyazev & Argentati 2002, as in ``scipy.linalg.subspace_angles``).
    """
    a, b = _to_f64(A, "A"), _to_f64(B, "B")
    d = hidden_size
    if d is None:
        d = int(a.shape[0]) if a.ndim == 1 else int(b.shape[0]) if b.ndim == 1 else None
    if d is None:
        d = _hidden_size(a)
        if d not in b.shape:  # A was given as d × k with d the shorter axis? try B's view
            d_b = _hidden_size(b)
            if d_b in a.shape:
                d = d_b
    QA = _basis(a, "A", d)
    QB = _basis(b, "B", d)
    C = QA.T @ QB
    cos = np.clip(np.linalg.svd(C, compute_uv=False), 0.0, 1.0)  # descending -> ascending angles
    # Residual of the smaller basis projected off the larger: its singular values are the sines.
    resid = QB - QA @ C if QA.shape[1] >= QB.shape[1] else QA - QB @ C.T
    sin = np.sort(np.clip(np.linalg.svd(resid, compute_uv=False), 0.0, 1.0))  # ascending angles
    theta = np.where(cos**2 >= 0.5, np.arcsin(sin), np.arccos(cos))
    return np.sort(np.clip(theta, 0.0, np.pi / 2))


def grassmann_distance(A: ArrayLike, B: ArrayLike, *, hidden_size: int | None = None) -> float:
    """Grassmann (geodesic) distance ``√Σ θᵢ²`` over the principal angles θ, in radians."""
    theta = principal_angles(A, B, hidden_size=hidden_size)
    return float(np.sqrt(np.sum(theta**2)))


def sign_fix(r: ArrayLike, reference: ArrayLike) -> F64:
    """Return ``r`` or ``−r`` (float64) so that ``r · reference ≥ 0``.

    ``reference`` is normally the harmful − harmless mean difference at the carrier's layer and
    position, which fixes the otherwise arbitrary sign of a direction (docs/methods.md §5). ``r``
    is returned unchanged when it is exactly orthogonal to the reference.
    """
    x, ref = _vector(r, "r"), _vector(reference, "reference")
    _same_size(x, ref, "r", "reference")
    return -x if float(np.dot(x, ref)) < 0 else x


def direction_drift(
    r0: ArrayLike,
    rt: ArrayLike,
    reference: ArrayLike | tuple[ArrayLike, ArrayLike] | None = None,
) -> float:
    """Drift of a direction between step 0 and step t (docs/methods.md §5), dimensionless.

    Without ``reference``: ``1 − |cos(r0, rt)|`` in [0, 1]: 0 for the same line (whatever the sign),
    1 for orthogonal directions. It equals ``1 − cos θ`` for the angle θ ∈ [0, π/2] (radians) between
    the two lines.

    With ``reference`` (the harmful − harmless mean difference; one vector for both steps, or a pair
    ``(reference_0, reference_t)`` with each checkpoint's own): each direction is first sign-fixed so
    that its projection on its reference is ≥ 0, and the drift is ``1 − cos(r0, rt)`` in [0, 2]. It
    equals the reference-free drift unless the direction's orientation relative to harmful − harmless
    has flipped, in which case it exceeds 1.
    """
    a, b = _vector(r0, "r0"), _vector(rt, "rt")
    _same_size(a, b, "r0", "rt")
    if reference is None:
        return float(1.0 - abs(cosine(a, b)))
    if isinstance(reference, tuple):
        if len(reference) != 2:
            raise SafegeomError("reference must be one vector or a pair (reference_0, reference_t)")
        ref0, reft = reference
    else:
        ref0 = reft = reference
    return float(1.0 - cosine(sign_fix(a, ref0), sign_fix(b, reft)))


def subspace_drift(B0: ArrayLike, Bt: ArrayLike, *, hidden_size: int | None = None) -> F64:
    """Drift of a subspace carrier: principal angles (radians, ascending, in [0, π/2]) between the
    step-t carrier ``Bt`` and the step-0 carrier ``B0`` (docs/methods.md §4 proposal: drift =
    principal angles to the step-0 carrier). Reduce with :func:`grassmann_distance` for one number.
    """
    return principal_angles(B0, Bt, hidden_size=hidden_size)


def effective_rank(M_or_singular_values: ArrayLike) -> float:
    """Effective rank ``exp(H(p))`` with ``p = σ / Σσ`` and ``H`` the Shannon entropy (nats).

    This is our choice (docs/methods.md §4 proposal; the Roy & Vetterli 2007 definition). A 2-D
    input is a matrix whose singular values are taken; a 1-D input is read as the singular values
    themselves (non-negative). The result lies in [1, number of singular values]: 1.0 for a rank-1
    matrix, k for k equal non-zero singular values. Raises ValueError for a zero matrix or negative
    values.
    """
    x = _to_f64(M_or_singular_values, "M_or_singular_values")
    if x.ndim == 2:
        s = np.linalg.svd(x, compute_uv=False)
    elif x.ndim == 1:
        if np.any(x < 0):
            raise SafegeomError("singular values must be non-negative")
        s = x
    else:
        raise SafegeomError(
            f"effective_rank expects a matrix or a 1-D array of singular values, got shape {x.shape}"
        )
    total = float(np.sum(s))
    if total == 0.0:
        raise SafegeomError("effective rank of a zero matrix is undefined")
    p = s / total
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def coordinate_statistics(
    basis: ArrayLike, harmful: ArrayLike, harmless: ArrayLike
) -> pd.DataFrame:
    """Per-coordinate statistics of a carrier basis on harmful vs harmless activations.

    docs/methods.md §5 *proposal* (our choice). ``basis`` is a direction (``d``) or a
    ``d × k`` / ``k × d`` basis; ``harmful`` and ``harmless`` are ``[n, d]`` activations (n ≥ 2
    each). Each basis vector is normalised to unit length (not orthogonalised), so coordinate ``j``
    of ``h`` is the scalar projection ``⟨h, b̂_j⟩`` in activation units.

    Returns a DataFrame with one row per basis vector and columns
    ``coordinate`` (j), ``mean_harmful``, ``var_harmful``, ``mean_harmless``, ``var_harmless``
    (variances with ddof=1), ``n_harmful``, ``n_harmless`` and ``separation``: Cohen's d,
    ``(mean_harmful − mean_harmless) / pooled_sd`` with
    ``pooled_sd = √(((n₁−1)v₁ + (n₂−1)v₂)/(n₁+n₂−2))`` (dimensionless; ±inf if the pooled sd is 0 and
    the means differ, NaN if both are equal).
    """
    H = _to_f64(harmful, "harmful")
    L = _to_f64(harmless, "harmless")
    for name, X in (("harmful", H), ("harmless", L)):
        if X.ndim != 2:
            raise SafegeomError(f"{name} must be [n_prompts, d], got shape {X.shape}")
        if X.shape[0] < 2:
            raise SafegeomError(f"{name} needs at least 2 prompts for a variance, got {X.shape[0]}")
    _same_size(H, L, "harmful", "harmless")
    d = int(H.shape[1])
    Bm = _columns(_to_f64(basis, "basis"), "basis", d)
    norms = np.linalg.norm(Bm, axis=0)
    if np.any(norms <= _ZERO_NORM):
        raise SafegeomError(
            f"basis vector(s) {np.flatnonzero(norms <= _ZERO_NORM).tolist()} are zero"
        )
    Bm = Bm / norms
    ch, cl = H @ Bm, L @ Bm  # [n, k] coordinates
    n1, n2 = ch.shape[0], cl.shape[0]
    m1, m2 = ch.mean(axis=0), cl.mean(axis=0)
    v1, v2 = ch.var(axis=0, ddof=1), cl.var(axis=0, ddof=1)
    pooled = np.sqrt(((n1 - 1) * v1 + (n2 - 1) * v2) / (n1 + n2 - 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        sep = (m1 - m2) / pooled
    return pd.DataFrame(
        {
            "coordinate": np.arange(Bm.shape[1]),
            "mean_harmful": m1,
            "var_harmful": v1,
            "mean_harmless": m2,
            "var_harmless": v2,
            "n_harmful": n1,
            "n_harmless": n2,
            "separation": sep,
        }
    )


def coordinate_imbalance(
    df: pd.DataFrame,
    *,
    measure: Literal["std", "range"] = "std",
    absolute: bool = True,
) -> float:
    """Imbalance of a basis: dispersion of the per-coordinate separation (Cohen's d) across j.

    docs/methods.md §5 *proposal* (our choice). ``df`` comes from :func:`coordinate_statistics`.
    ``measure="std"`` (default) is the population standard deviation (ddof=0) across coordinates;
    ``"range"`` is max − min. With ``absolute=True`` (default) the dispersion is of ``|d|``, because
    the sign of a basis vector (from QR or SVD) is arbitrary. 0.0 for a single coordinate or evenly
    separated coordinates; in units of Cohen's d. Raises ValueError on non-finite separations.
    """
    if "separation" not in df.columns:
        raise SafegeomError("df must come from coordinate_statistics (no 'separation' column)")
    sep = df["separation"].to_numpy(dtype=np.float64)
    if sep.size == 0:
        raise SafegeomError("df has no coordinates")
    if not np.all(np.isfinite(sep)):
        raise NonFiniteError(
            "separation contains NaN or inf (a coordinate has zero pooled variance)"
        )
    if absolute:
        sep = np.abs(sep)
    if measure == "std":
        return float(np.std(sep))
    if measure == "range":
        return float(np.max(sep) - np.min(sep))
    raise ConfigError(f"unknown measure {measure!r}: use 'std' or 'range'")


def _one_vector(m: F64) -> F64:
    """A ``[d, 1]`` or ``[1, d]`` basis as the direction ``[d]`` it holds; others unchanged."""
    return m.reshape(-1) if m.ndim == 2 and 1 in m.shape else m


def coupling(
    h: ArrayLike,
    r: ArrayLike,
    *,
    reduce: Literal["mean_cos2", "max_cos2"] = "mean_cos2",
    hidden_size: int | None = None,
) -> float:
    """Coupling of a harmfulness carrier ``h`` and a refusal carrier ``r``, in [0, 1] (dimensionless).

    docs/methods.md §4 *proposal* (our choice; the papers report coupling without a formula):
    - two one-dimensional carriers (each a 1-D direction ``[d]`` or a one-vector basis ``[d, 1]``
      or ``[1, d]``, which is the same carrier): ``|cos(h, r)|``, whatever ``reduce``;
    - otherwise (either spans two or more dimensions; a direction is its 1-dimensional span): a
      reduction of the squared cosines of the principal angles θ between the spans:
      ``reduce="mean_cos2"`` (default) gives ``mean(cos² θ)``, ``"max_cos2"`` gives ``max(cos² θ)``
      (= cos² of the smallest angle).
    0 means orthogonal carriers, 1 means one carrier lies in the other.

    Returns:
        The coupling, a float in [0, 1].
    """
    if reduce not in ("mean_cos2", "max_cos2"):
        raise ConfigError(f"unknown reduce {reduce!r}: use 'mean_cos2' or 'max_cos2'")
    a, b = _one_vector(_to_f64(h, "h")), _one_vector(_to_f64(r, "r"))
    if a.ndim == 1 and b.ndim == 1:
        return abs(cosine(a, b))
    cos2 = np.cos(principal_angles(a, b, hidden_size=hidden_size)) ** 2
    value = float(np.mean(cos2)) if reduce == "mean_cos2" else float(np.max(cos2))
    return float(np.clip(value, 0.0, 1.0))
