"""The standard set of carriers of one model, extracted together and saved as one folder.

:func:`extract_carriers` runs refusal-direction selection (diff-in-means at ``t_post`` + bypass,
induce and KL selection), the harmfulness direction at ``t_inst`` of the same layer, and the cheap
refusal cone; it reports the H/R coupling and the cone's effective rank. :meth:`CarrierSuite.save`
writes ``refusal``, ``harmfulness`` and ``cone`` carriers (safetensors + JSON), the candidate table
(``candidates.parquet``) and ``summary.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safegeom.carriers.carrier import Carrier
from safegeom.carriers.cones import cheap_cone
from safegeom.carriers.harmfulness import harmfulness_direction
from safegeom.carriers.refusal import RefusalSelection, SelectionConfig, refusal_direction
from safegeom.geometry import coupling
from safegeom.models.loading import LoadedModel
from safegeom.prompts import PromptSet, load_prompts

__all__ = ["CarrierSuite", "extract_carriers"]


@dataclass(frozen=True)
class CarrierSuite:
    """Refusal direction, harmfulness direction and refusal cone of one model."""

    selection: RefusalSelection
    harmfulness: Carrier
    cone: Carrier | None

    @property
    def refusal(self) -> Carrier:
        """The selected refusal direction."""
        return self.selection.carrier

    @property
    def hr_coupling(self) -> float:
        """|cos| between the harmfulness and refusal directions (METHODS §4 proposal)."""
        return coupling(self.harmfulness.direction, self.refusal.direction)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary: selected layer/position, scores, coupling, cone rank, cost."""
        return {
            "refusal": {
                "layer": self.refusal.layer,
                "position": self.refusal.position,
                "norm": float(self.refusal.direction.norm()),
                **self.refusal.scores,
            },
            "harmfulness": {"layer": self.harmfulness.layer, "position": self.harmfulness.position},
            "hr_coupling": self.hr_coupling,
            "cone": None
            if self.cone is None
            else {"k": self.cone.k, "layer": self.cone.layer, **self.cone.scores},
            "selection": {
                "n_candidates": len(self.selection.table),
                "n_kept": int(self.selection.table["kept"].sum()),
                "forward_passes": self.selection.n_forward_passes,
                "rows": self.selection.n_rows,
                "seconds": self.selection.seconds,
            },
            "provenance": dict(self.refusal.provenance),
        }

    def save(self, folder: str | Path) -> Path:
        """Write the carriers, the candidate table and ``summary.json`` into ``folder``."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        self.refusal.save(out / "refusal")
        self.harmfulness.save(out / "harmfulness")
        if self.cone is not None:
            self.cone.save(out / "cone")
        self.selection.table.to_parquet(out / "candidates.parquet", index=False)
        (out / "summary.json").write_text(json.dumps(self.summary(), indent=2, sort_keys=True))
        return out


def extract_carriers(
    lm: LoadedModel,
    harmful: PromptSet | str = "advbench:train",
    harmless: PromptSet | str = "alpaca:train",
    harmful_val: PromptSet | str = "advbench:val",
    harmless_val: PromptSet | str = "alpaca:val",
    config: SelectionConfig = SelectionConfig(),
    *,
    cone_k: int = 3,
    progress: bool = True,
) -> CarrierSuite:
    """Extract the refusal direction, the harmfulness direction and (``cone_k > 0``) the cheap cone.

    The harmfulness direction and the cone use the same training prompts (first ``n_train`` of
    each class) and the refusal direction's layer.
    """
    selection = refusal_direction(
        lm, harmful, harmless, harmful_val, harmless_val, config, progress=progress
    )
    h_set = load_prompts(harmful).take(config.n_train)
    s_set = load_prompts(harmless).take(config.n_train)
    harm = harmfulness_direction(
        lm, h_set, s_set, refusal=selection.carrier, system=config.system, progress=progress
    )
    cone = None
    if cone_k > 0:
        hv = load_prompts(harmful_val).take(config.n_val)
        sv = load_prompts(harmless_val).take(config.n_val)
        cone = cheap_cone(
            lm, h_set, s_set, k=cone_k, refusal=selection.carrier, harmful_val=hv,
            harmless_val=sv, system=config.system, progress=progress,
        )  # fmt: skip
    return CarrierSuite(selection=selection, harmfulness=harm, cone=cone)
