"""Carriers: directions and subspaces that carry refusal or harmfulness, with provenance.

The maths is on tensors (:mod:`safegeom.carriers.fit`: activations in, carrier out); the extraction
functions capture, fit and score; :data:`CARRIER_TYPES` names every carrier a suite and an audit
fit (:mod:`safegeom.carriers.registry`).

Under a launcher the captures shard through :mod:`safegeom.activations` and the scoring passes
(refusal filter, candidate selection, cone and admissibility scores) through
:mod:`safegeom.carriers.row_scores`: every rank gets one process's carriers.
"""

from safegeom.carriers.admissible import (
    admissibility_table,
    admissible_carrier,
    carrier_effective_rank,
    dim_layer_candidates,
    leading_subspaces,
)
from safegeom.carriers.candidate_scores import CandidateScores, ForwardCounter, score_candidates
from safegeom.carriers.carrier import Carrier, load_carrier
from safegeom.carriers.cones import cheap_cone, cone_directions, score_cone
from safegeom.carriers.fit import Fitted, cone_basis, diff_in_means, fit_cone, fit_dim
from safegeom.carriers.harmfulness import harmfulness_direction
from safegeom.carriers.probes import (
    ProbeFit,
    fit_probe,
    fit_probe_carrier,
    probe_carrier,
    probe_layers,
)
from safegeom.carriers.rdo import RDOConfig, RDOTargets, rdo_cone, rdo_direction, rdo_targets
from safegeom.carriers.refusal import (
    DimCandidates,
    RefusalSelection,
    SelectionConfig,
    dim_candidates,
    filter_by_refusal,
    refusal_direction,
    select_refusal_direction,
)
from safegeom.carriers.registry import (
    CARRIER_TYPES,
    CarrierType,
    ClassActivations,
    carrier_type,
    register_carrier_type,
)
from safegeom.carriers.selection import load_selection
from safegeom.carriers.suite import CarriersConfig, CarrierSuite, extract_carriers, load_suite

__all__ = [
    "CARRIER_TYPES",
    "CandidateScores",
    "Carrier",
    "CarrierSuite",
    "CarrierType",
    "CarriersConfig",
    "ClassActivations",
    "DimCandidates",
    "Fitted",
    "ForwardCounter",
    "ProbeFit",
    "RDOConfig",
    "RDOTargets",
    "RefusalSelection",
    "SelectionConfig",
    "admissibility_table",
    "admissible_carrier",
    "carrier_effective_rank",
    "carrier_type",
    "cheap_cone",
    "cone_basis",
    "cone_directions",
    "diff_in_means",
    "dim_candidates",
    "dim_layer_candidates",
    "extract_carriers",
    "filter_by_refusal",
    "fit_cone",
    "fit_dim",
    "fit_probe",
    "fit_probe_carrier",
    "harmfulness_direction",
    "leading_subspaces",
    "load_carrier",
    "load_selection",
    "load_suite",
    "probe_carrier",
    "probe_layers",
    "rdo_cone",
    "rdo_direction",
    "rdo_targets",
    "refusal_direction",
    "register_carrier_type",
    "score_candidates",
    "score_cone",
    "select_refusal_direction",
]
