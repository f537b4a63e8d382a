"""Linear probes for harmfulness (or refusal) per layer and position.

A scikit-learn :class:`~sklearn.linear_model.LogisticRegression` is fitted on standardised
activations (harmful = 1, harmless = 0) with a deterministic stratified train/test split; the
held-out accuracy and AUROC say how linearly readable the concept is at each (layer, position).
:func:`fit_probe_carrier` turns the best probe over some layers into a :class:`Carrier` (activations
in): the weight vector mapped back from standardised to activation coordinates;
:func:`probe_carrier` captures, fits and records provenance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from numpy.typing import NDArray
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from safegeom.activations import CaptureConfig, capture
from safegeom.carriers.carrier import Carrier
from safegeom.carriers.inputs import Prompts, prompt_provenance
from safegeom.errors import NonFiniteError, SafegeomError
from safegeom.models.loading import LoadedModel
from safegeom.prompts import load_prompts

__all__ = [
    "ProbeFit",
    "fit_probe",
    "fit_probe_carrier",
    "probe_carrier",
    "probe_layers",
    "probe_split",
]


@dataclass(frozen=True)
class ProbeFit:
    """A fitted probe and its held-out performance."""

    accuracy: float
    """Held-out accuracy, in [0, 1]."""
    auroc: float
    """Held-out area under the ROC curve, in [0, 1] (0.5 = chance)."""
    n_train: int
    n_test: int
    weight: NDArray[np.float64]
    """``[d]`` normal of the decision boundary in *activation* coordinates (standardised weights
    divided by the feature scales): ``logit = weight · h + intercept``."""
    intercept: float


def probe_split(
    labels: Int[NDArray, " n"], *, test_fraction: float = 0.3, seed: int = 0
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Deterministic stratified split: ``(train_indices, test_indices)``, each sorted.

    Raises:
        SafegeomError: ``test_fraction`` outside (0, 1), or a class with fewer than 2 examples.
    """
    y = np.asarray(labels)
    if not 0.0 < test_fraction < 1.0:
        raise SafegeomError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    counts = np.bincount(y.astype(np.int64), minlength=2)
    if counts.min() < 2:
        raise SafegeomError(f"a probe needs at least 2 prompts per class, got {counts.tolist()}")
    n_test = min(max(round(test_fraction * len(y)), 2), len(y) - 2)
    train, test = train_test_split(
        np.arange(len(y)), test_size=n_test, random_state=seed, stratify=y
    )
    return np.sort(train), np.sort(test)


def fit_probe(
    features: Float[NDArray, "n d"] | Float[torch.Tensor, "n d"],
    labels: Int[NDArray, " n"],
    *,
    test_fraction: float = 0.3,
    seed: int = 0,
    C: float = 1.0,
    split: tuple[NDArray[np.int64], NDArray[np.int64]] | None = None,
) -> ProbeFit:
    """Fit a standardised logistic-regression probe and score it on a held-out split.

    Args:
        features: ``[n, d]`` activations (any float dtype; computed in float64).
        labels: ``[n]`` 0/1 labels (1 = harmful).
        test_fraction: fraction held out (ignored when ``split`` is given).
        seed: seed of the split and the solver.
        C: inverse L2 regularisation strength.
        split: explicit ``(train, test)`` indices (e.g. shared across layers).

    Returns:
        :class:`ProbeFit` with held-out accuracy and AUROC and the activation-space weight.

    Raises:
        SafegeomError: shape mismatch, NaN/inf, or too few examples per class.
    """
    x = np.asarray(
        features.detach().cpu().double() if isinstance(features, torch.Tensor) else features,
        dtype=np.float64,
    )
    y = np.asarray(labels).astype(np.int64)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise SafegeomError(
            f"features must be [n, d] with n = len(labels), got {x.shape}, {y.shape}"
        )
    if not np.all(np.isfinite(x)):
        raise NonFiniteError("features contain NaN or inf")
    train, test = split or probe_split(y, test_fraction=test_fraction, seed=seed)
    scaler = StandardScaler().fit(x[train])
    model = LogisticRegression(C=C, max_iter=1000, random_state=seed)
    model.fit(scaler.transform(x[train]), y[train])
    z_test = scaler.transform(x[test])
    prob = model.predict_proba(z_test)[:, 1]
    accuracy = float((model.predict(z_test) == y[test]).mean())
    auroc = float(roc_auc_score(y[test], prob)) if len(set(y[test].tolist())) == 2 else np.nan
    weight = model.coef_[0] / scaler.scale_
    intercept = float(model.intercept_[0] - weight @ scaler.mean_)
    return ProbeFit(accuracy, auroc, len(train), len(test), weight, intercept)


def _activations(
    lm: LoadedModel, harmful: Prompts, harmless: Prompts, positions: str, layers, system, progress
):
    h_set, s_set = load_prompts(harmful), load_prompts(harmless)
    acts = [
        capture(
            lm,
            p,
            CaptureConfig(layers=layers, positions=positions, dtype=torch.float32, system=system),
            progress=progress,
        )
        for p in (h_set, s_set)
    ]
    if acts[0].positions != acts[1].positions:
        raise SafegeomError(
            "harmful and harmless prompts have different post-instruction positions"
        )
    x = torch.cat([acts[0]["resid_pre"], acts[1]["resid_pre"]])  # [n, layer, pos, d]
    y = np.r_[np.ones(len(h_set), np.int64), np.zeros(len(s_set), np.int64)]
    return h_set, s_set, x, y, acts[0].layers, acts[0].positions


def probe_layers(
    lm: LoadedModel,
    harmful: Prompts,
    harmless: Prompts,
    *,
    positions: str = "t_inst,t_post",
    layers: str | int | Sequence[int] = "all",
    test_fraction: float = 0.3,
    seed: int = 0,
    C: float = 1.0,
    system: str | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Probe every (layer, position) of ``resid_pre`` for harmful vs harmless.

    One stratified split (seeded) is shared by all rows, so rows are comparable.

    Returns:
        A DataFrame with one row per (layer, position): ``layer``, ``position``, ``accuracy``,
        ``auroc`` (held-out, in [0, 1]), ``n_train``, ``n_test``, ``C``.

    Raises:
        SafegeomError: an empty prompt set, a layer out of range, fewer than 2 prompts per class.
    """
    _, _, x, y, layer_ids, labels = _activations(
        lm, harmful, harmless, positions, layers, system, progress
    )
    split = probe_split(y, test_fraction=test_fraction, seed=seed)
    rows = []
    for j, layer in enumerate(layer_ids):
        for p, label in enumerate(labels):
            fit = fit_probe(x[:, j, p], y, seed=seed, C=C, split=split)
            rows.append(
                {
                    "layer": layer,
                    "position": label,
                    "accuracy": fit.accuracy,
                    "auroc": fit.auroc,
                    "n_train": fit.n_train,
                    "n_test": fit.n_test,
                    "C": C,
                }
            )
    return pd.DataFrame(rows)


def probe_carrier(
    lm: LoadedModel,
    harmful: Prompts,
    harmless: Prompts,
    *,
    layer: int | None = None,
    position: str = "t_inst",
    kind: str = "harmfulness",
    test_fraction: float = 0.3,
    seed: int = 0,
    C: float = 1.0,
    system: str | None = None,
    progress: bool = False,
) -> Carrier:
    """The probe direction at one (layer, position) as a :class:`Carrier` (``method="probe"``).

    ``layer=None`` probes every layer and keeps the best by held-out AUROC (then accuracy, then
    the earliest layer). The vector is the unit activation-space probe normal, pointing to
    harmful, scaled by the projection of ``mean_harmful − mean_harmless`` (all prompts) on it, so
    its norm is in activation units like a diff-in-means direction (our choice).

    Returns:
        A :class:`Carrier` with ``scores`` ``accuracy``, ``auroc`` (held-out), ``n_train``,
        ``n_test``, ``C`` and ``separation`` (the norm, activation units).

    Raises:
        SafegeomError: as :func:`probe_layers`; a position that names more than one token.
    """
    h_set, s_set, x, _, layer_ids, labels = _activations(
        lm, harmful, harmless, position, "all" if layer is None else layer, system, progress
    )
    if len(labels) != 1:
        raise SafegeomError(f"probe_carrier needs one position, {position!r} gives {list(labels)}")
    n = len(h_set)
    carrier = fit_probe_carrier(
        x[:n, :, 0],
        x[n:, :, 0],
        layer_ids,
        position=labels[0],
        kind=kind,
        test_fraction=test_fraction,
        seed=seed,
        C=C,
    )
    provenance = prompt_provenance(lm, h_set, s_set, seed=seed, system=system)
    return replace(carrier, provenance=provenance)


def fit_probe_carrier(
    harmful: Float[torch.Tensor, "n layer d"],
    harmless: Float[torch.Tensor, "m layer d"],
    layers: Sequence[int],
    *,
    position: str,
    kind: str = "harmfulness",
    test_fraction: float = 0.3,
    seed: int = 0,
    C: float = 1.0,
) -> Carrier:
    """The best probe direction over ``layers`` as a :class:`Carrier` (``method="probe"``), from
    activations alone.

    One stratified split (seeded) is shared by every layer; the best layer has the highest
    held-out AUROC (then accuracy, then the earliest). The vector is the unit activation-space
    probe normal, pointing to harmful, scaled by the projection of ``mean_harmful −
    mean_harmless`` (all prompts) on it, so its norm is in activation units like a diff-in-means
    direction (our choice).

    Args:
        harmful, harmless: per-prompt activations ``[n, layer, d]`` of each class.
        layers: the block index of each layer column.
        position: the token position the activations were read at.

    Returns:
        A :class:`Carrier` with ``scores`` ``accuracy``, ``auroc`` (held-out), ``n_train``,
        ``n_test``, ``C`` and ``separation`` (the norm, activation units).

    Raises:
        SafegeomError: shapes that disagree, fewer than 2 prompts per class, or classes the probe
            cannot separate (a zero weight).
    """
    if harmful.dim() != 3 or harmless.shape[1:] != harmful.shape[1:]:
        raise SafegeomError(
            f"probe activations must be [n, layer, d] for both classes, got "
            f"{tuple(harmful.shape)} and {tuple(harmless.shape)}"
        )
    if len(layers) != harmful.shape[1]:
        raise SafegeomError(
            f"{len(layers)} layer indices for {harmful.shape[1]} layer columns; name every layer"
        )
    x = torch.cat([harmful, harmless])
    y = np.r_[np.ones(len(harmful), np.int64), np.zeros(len(harmless), np.int64)]
    split = probe_split(y, test_fraction=test_fraction, seed=seed)
    fits = [fit_probe(x[:, j], y, seed=seed, C=C, split=split) for j in range(len(layers))]
    best = max(
        range(len(fits)),
        key=lambda j: (np.nan_to_num(fits[j].auroc, nan=-1.0), fits[j].accuracy, -j),
    )
    fit, feats = fits[best], x[:, best].double().numpy()
    if not np.any(fit.weight):
        raise SafegeomError("the probe weight is zero: the classes are not separable at this site")
    w = fit.weight / np.linalg.norm(fit.weight)
    gap = float((feats[y == 1].mean(0) - feats[y == 0].mean(0)) @ w)
    vector = w * (abs(gap) if gap != 0 else 1.0)
    return Carrier(
        vectors=torch.from_numpy(vector),
        kind=kind,
        method="probe",
        site="resid_pre",
        layer=int(layers[best]),
        position=position,
        scores={
            "accuracy": fit.accuracy,
            "auroc": float(fit.auroc),
            "n_train": float(fit.n_train),
            "n_test": float(fit.n_test),
            "C": float(C),
            "separation": float(np.linalg.norm(vector)),
        },
    )
