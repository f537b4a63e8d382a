"""Interventions on the residual stream.

The values (:mod:`safegeom.interventions.values`) are the everyday spelling:

- :class:`Ablation`: directional or subspace ablation ``h ← h − B Bᵀ h`` at every block input and
  every attention and MLP output (Arditi et al. 2024), or at chosen layers;
- :class:`Addition`: activation addition ``h ← h + c·v`` at chosen layers and positions;
- :class:`AffineEdit`: the affine concept edit of Marshall et al. ("Refusal in LLMs is an affine
  function"): ``h ← h − (h·r̂) r̂ + (μ·r̂) r̂ + α r̂``.

Each takes a :class:`~safegeom.carriers.Carrier` or a tensor, binds to a model with
``with Ablation(c).on(lm): ...`` or ``h = Ablation(c).attach(lm); ...; h.remove()``, and describes
itself with ``to_dict()`` for provenance. The functions :func:`ablate`, :func:`add` and
:func:`affine_edit` (context managers) are their implementation; :func:`orthogonalize_weights` is
the weight-space twin of ablation, returning an edited *copy* that saves as a normal checkpoint.
Row-wise variants (:func:`ablate_rows`, :func:`add_rows`: a different direction per batch row)
let carrier selection and sweeps score many candidates in one batched forward pass.

Positions for addition: ``all`` (every position, generated tokens included), ``prompt`` (the
prompt forward pass only), or ``instruction`` (the prompt pass, all positions before the
``t_post`` template tokens).
"""

from safegeom.interventions.functions import (
    ABLATION_SITES,
    ablate,
    ablate_rows,
    add,
    add_rows,
    affine_edit,
    as_basis,
    orthogonalize_weights,
)
from safegeom.interventions.values import (
    Ablation,
    Addition,
    AffineEdit,
    InterventionHandle,
    vectors_hash,
)

__all__ = [
    "ABLATION_SITES",
    "Ablation",
    "Addition",
    "AffineEdit",
    "InterventionHandle",
    "ablate",
    "ablate_rows",
    "add",
    "add_rows",
    "affine_edit",
    "as_basis",
    "orthogonalize_weights",
    "vectors_hash",
]
