"""Carriers: directions and subspaces that carry refusal or harmfulness, with provenance."""

from safegeom.carriers.carrier import Carrier, load_carrier
from safegeom.carriers.refusal import (
    DimCandidates,
    RefusalSelection,
    SelectionConfig,
    dim_candidates,
    filter_by_refusal,
    refusal_direction,
    select_refusal_direction,
)
from safegeom.carriers.scoring import CandidateScores, ForwardCounter, score_candidates

__all__ = [
    "CandidateScores",
    "Carrier",
    "DimCandidates",
    "ForwardCounter",
    "RefusalSelection",
    "SelectionConfig",
    "dim_candidates",
    "filter_by_refusal",
    "load_carrier",
    "refusal_direction",
    "score_candidates",
    "select_refusal_direction",
]
